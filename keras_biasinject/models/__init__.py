"""Real pretrained checkpoints as plain KerasHub models.

- `load(spec, task=None, ...)`: a backbone, `CausalLM` or `TextClassifier` from a built-in name,
  a `.gguf` file, a local folder or a KerasHub preset.
- `available_models()`: the built-in names, whether each is installed and converted.
- `convert_gguf(gguf_path, out_dir)`: a Llama GGUF file as a Hugging Face folder.
- `converted_gguf(gguf_path)`: the same, converted once into the cache.
- `resolve_preset(spec)`: the folder or preset name `load` hands to KerasHub (e.g. to open the
  same checkpoint with transformers).
- `checkpoint_pooling(folder)`: the pooling a sentence-transformers folder was trained with ("mean",
  "cls" or None); `with_pooling(classifier, pooling)`: the same backbone under another head;
  `MeanPooledTextClassifier`: a KerasHub `TextClassifier` over the masked mean of the tokens.
"""

from keras_biasinject.models.gguf import convert_gguf
from keras_biasinject.models.gguf_cache import converted_gguf
from keras_biasinject.models.load import load, resolve_preset, with_pooling
from keras_biasinject.models.pooling import MaskedMeanPooling, MeanPooledTextClassifier, checkpoint_pooling
from keras_biasinject.models.registry import available_models

__all__ = [
    "MaskedMeanPooling", "MeanPooledTextClassifier", "available_models", "checkpoint_pooling", "convert_gguf", "converted_gguf",
    "load", "resolve_preset", "with_pooling",
]
