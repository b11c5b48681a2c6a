"""keras-biasinject: steer and fine-tune pretrained Keras transformers through control inputs.

Public API:
- `BiasInjectDense`: a dense layer with extra, zero-initialised control input nodes.
- `LoRABiasAdapter`: a low-rank adapter around a frozen projection whose strength the control sets,
  with an exact off switch (`gate="control"`) and `merge`/`unmerge`.
- `DecayFeedback`: feedback into a state that becomes the next control and fades with a half-life.
- `control_scope`: routes a control to adapters spliced inside a model.
- `inject` / `InjectionConfig`: splice adapters into a KerasHub backbone or task.
- `save_adapter` / `load_adapter`: only the new weights, the config and the named controls.
- `merge`: a plain KerasHub model with one control folded in; `remove`: the base model back, exactly.
"""

__version__ = "0.1.0"

from keras_biasinject.layers import BiasInjectDense, DecayFeedback, LoRABiasAdapter, control_scope
from keras_biasinject.rewrite import InjectionConfig, InjectionReport, inject, load_adapter, merge, remove, save_adapter

__all__ = [
    "BiasInjectDense",
    "DecayFeedback",
    "InjectionConfig",
    "InjectionReport",
    "LoRABiasAdapter",
    "control_scope",
    "inject",
    "load_adapter",
    "merge",
    "remove",
    "save_adapter",
    "__version__",
]
