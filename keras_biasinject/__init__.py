"""keras-biasinject: steer and fine-tune pretrained Keras transformers through control inputs.

Public API:
- `BiasInjectDense`: a dense layer with extra, zero-initialised control input nodes.
- `LoRABiasAdapter`: a low-rank adapter around a frozen projection whose strength the control sets,
  with an exact off switch (`gate="control"`) and `merge`/`unmerge`.
- `DecayFeedback`: feedback into a state that becomes the next control and fades with a half-life.
- `control_scope`: routes a control to adapters spliced inside a model.
"""

__version__ = "0.1.0"

from keras_biasinject.layers import BiasInjectDense, DecayFeedback, LoRABiasAdapter, control_scope

__all__ = ["BiasInjectDense", "DecayFeedback", "LoRABiasAdapter", "control_scope", "__version__"]
