"""keras-biasinject: steer and fine-tune pretrained Keras transformers through control inputs.

Public API:
- `BiasInjectDense`: a dense layer with extra, zero-initialised control input nodes.
- `LoRABiasAdapter`: a low-rank adapter around a frozen projection whose strength the control sets,
  with an exact off switch (`gate="control"`) and `merge`/`unmerge`.
- `DecayFeedback`: feedback into a state that becomes the next control and fades with a half-life.
- `FeedbackHead` / `add_feedback_head`: output nodes that read the model's own hidden states.
- `FeedbackLoop`: a session whose control follows the model's own readings and ratings, with decay.
- `control_scope`: routes a control to adapters spliced inside a model.
- `inject` / `InjectionConfig`: splice adapters into a KerasHub backbone or task.
- `control_from_examples`: a steering vector from contrastive examples, as the control's weights.
- `save_adapter` / `load_adapter`: only the new weights, the config and the named controls.
- `merge`: a plain KerasHub model with one control folded in; `remove`: the base model back, exactly.
- `load_peft_adapter` / `export_peft`: Hugging Face PEFT LoRA folders in and out.
- `load_control_vector` / `export_control_vector` / `read_control_vector`: llama.cpp control vectors (GGUF).
- `load`: real pretrained checkpoints (built-in names, GGUF files, Hugging Face folders, presets).
- `DataConfig` / `make_dataset` / `load_dataset`: `tf.data` pipelines with a control per example.
- `Recipe` / `load_recipe` / `finetune`: runs against the control groups, with a report.
"""

__version__ = "0.1.0"

import importlib

# The layers and the injected model class are imported now: they register themselves with Keras,
# so that `keras.models.load_model` finds them after `import keras_biasinject`.
import keras_biasinject.models.pooling  # noqa: F401  (registers the mean-pooling classifier for load_model)
from keras_biasinject.layers import BiasInjectDense, DecayFeedback, FeedbackHead, LoRABiasAdapter, control_scope
from keras_biasinject.rewrite import (
    InjectionConfig, InjectionReport, add_feedback_head, control_from_examples, export_control_vector, export_peft, inject,
    load_adapter, load_control_vector, load_peft_adapter, merge, read_control_vector, remove, remove_feedback_head, save_adapter,
)

# The rest is imported on first use (PEP 562): loading models, data and recipes pulls in more.
_EXPORTS = {
    "load": "keras_biasinject.models",
    "available_models": "keras_biasinject.models",
    "DataConfig": "keras_biasinject.data",
    "make_dataset": "keras_biasinject.data",
    "load_dataset": "keras_biasinject.data",
    "Recipe": "keras_biasinject.recipes",
    "load_recipe": "keras_biasinject.recipes",
    "finetune": "keras_biasinject.recipes",
    "export_saved_model": "keras_biasinject.export",
    "export_onnx": "keras_biasinject.export",
    "FeedbackLoop": "keras_biasinject.loop",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_biasinject' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(
    [
        "BiasInjectDense", "DecayFeedback", "FeedbackHead", "InjectionConfig", "InjectionReport", "LoRABiasAdapter", "control_scope",
        "add_feedback_head", "control_from_examples", "remove_feedback_head",
        "inject", "load_adapter", "merge", "remove", "save_adapter", "__version__",
        "export_control_vector", "export_peft", "load_control_vector", "load_peft_adapter", "read_control_vector",
    ]
    + list(_EXPORTS)
)
