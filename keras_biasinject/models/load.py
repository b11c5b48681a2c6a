"""`load`: a real pretrained checkpoint as a plain KerasHub backbone, causal LM or text classifier.

`spec` may be a built-in name (`available_models()`), a `.gguf` file (converted once and cached),
a local Hugging Face or KerasHub preset folder, or any KerasHub preset name or handle
(`"bert_tiny_en_uncased"`, `"hf://..."`, `"kaggle://..."`), which KerasHub downloads.

Tasks are assembled from a backbone and a preprocessor rather than with `Task.from_preset`, which
works around three KerasHub 0.32 pitfalls for Llama checkpoints in Hugging Face format:
- its converter ignores `rms_norm_eps` (logits drift by about 1e-2): it is passed to the backbone
  as `layer_norm_epsilon`, since keyword arguments to `Llama3CausalLM.from_preset` do not reach it;
- `generate` prepends the start token even with `add_start_token=False`: when the tokenizer does not
  add one (`add_bos_token: false`, as for SmolLM2 in transformers), the packer's `start_value` is
  cleared, so `generate` sees the same token ids as transformers;
- its BERT tokenizer keeps accents that Hugging Face's strips when lowercasing ("Café" becomes
  [UNK] instead of "cafe"): `strip_accents` is passed on as `tokenizer_config.json` implies;
- a Llama 3 preset written with `save_to_preset` fails to reload: save weights, not presets.

Classifiers read the text as the checkpoint was trained to: `pooling=None` takes the pooling a
sentence-transformers folder names in `1_Pooling/config.json` (mean for all-MiniLM-L6-v2), and
KerasHub's own pooled [CLS] output otherwise; `pooling="cls"` or `"mean"` chooses (models/pooling.py).
"""

import json
import os
from pathlib import Path

import keras
import keras_hub
from keras_hub.src.layers.preprocessing.preprocessing_layer import PreprocessingLayer  # not exported by keras_hub

from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.models.gguf_cache import converted_gguf
from keras_biasinject.models.pooling import POOLINGS, MeanPooledTextClassifier, checkpoint_pooling
from keras_biasinject.models.registry import BUILTIN_MODELS, builtin_preset

TASKS = (None, "causal_lm", "classifier")
# Hugging Face model types whose KerasHub converter drops `rms_norm_eps`.
_RMS_EPS_IGNORED = ("llama",)
# Hugging Face model types whose KerasHub tokenizer converter drops accent stripping.
_WORDPIECE_ACCENTS = ("bert", "distilbert")


def load(spec, task=None, *, num_classes=None, sequence_length=None, dtype=None, pooling=None, **backbone_kwargs):
    """Load a pretrained checkpoint as a KerasHub backbone, `CausalLM` or `TextClassifier`.

    Args:
        spec: a built-in name ("minilm-l6", "smollm2-135m"), a `.gguf` file, a local Hugging Face
            or KerasHub preset folder, or a KerasHub preset name or handle.
        task: None for the backbone, "causal_lm" for a `CausalLM` with its preprocessor (so
            `lm.generate("text", max_length=32)` works), "classifier" for a `TextClassifier`.
        num_classes: number of classes; required for, and only used with, task="classifier".
        sequence_length: the preprocessor's packed length; None keeps KerasHub's default (1024
            for causal LMs, 512 for BERT classifiers). Only used with a task.
        dtype: the backbone's dtype policy, e.g. "float32" or "bfloat16"; None keeps the default.
        pooling: task="classifier" only: how the head reads the text. "cls": KerasHub's own classifier
            (its pooled [CLS] output); "mean": the mean of the sequence output over non-padding tokens
            (`MeanPooledTextClassifier`); None: the checkpoint's own (`checkpoint_pooling`: "mean" for a
            sentence-transformers folder trained with mean pooling), else "cls".
        **backbone_kwargs: passed on to the backbone's constructor (e.g. `dropout=0.1`).

    Returns:
        A `keras_hub.models.Backbone`, `CausalLM` or `TextClassifier` of the checkpoint's family.

    Example:
        >>> lm = load("smollm2-135m", task="causal_lm", sequence_length=128)
        >>> lm.generate("The capital of France is", max_length=16)
        >>> clf = load("minilm-l6", task="classifier", num_classes=2, sequence_length=128)
    """
    _check_arguments(spec, task, num_classes, sequence_length, pooling)
    preset = resolve_preset(spec)
    hf_config = _hf_config(preset)
    if dtype is not None:
        backbone_kwargs["dtype"] = dtype
    if hf_config.get("model_type") in _RMS_EPS_IGNORED and "rms_norm_eps" in hf_config:
        backbone_kwargs.setdefault("layer_norm_epsilon", hf_config["rms_norm_eps"])

    backbone = keras_hub.models.Backbone.from_preset(preset, **backbone_kwargs)
    if task is None:
        return backbone
    preprocessor_kwargs = {} if sequence_length is None else {"sequence_length": sequence_length}
    tokenizer_kwargs = _tokenizer_fixes(preset, hf_config)
    if tokenizer_kwargs:
        preprocessor_kwargs["tokenizer"] = keras_hub.tokenizers.Tokenizer.from_preset(preset, **tokenizer_kwargs)
    if task == "causal_lm":
        task_cls = _task_class(keras_hub.models.CausalLM, backbone, spec, task)
        preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset, **preprocessor_kwargs)
        tokenizer_config = _tokenizer_config(preset)
        if tokenizer_config.get("add_bos_token") is False:
            drop_start_token(preprocessor)
        if tokenizer_config.get("chat_template"):  # prompt/response data render through it (data/chat.py)
            preprocessor.tokenizer.chat_template = tokenizer_config["chat_template"]
        return preprocessing_built(task_cls(backbone=backbone, preprocessor=preprocessor))
    task_cls = _task_class(keras_hub.models.TextClassifier, backbone, spec, task)
    if (pooling or checkpoint_pooling(preset) or "cls") == "mean":
        task_cls = MeanPooledTextClassifier
    preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(preset, **preprocessor_kwargs)
    head = {"dropout": backbone_kwargs["dropout"]} if "dropout" in backbone_kwargs else {}  # the same rate for the head
    return preprocessing_built(task_cls(backbone=backbone, preprocessor=preprocessor, num_classes=num_classes, **head))


def preprocessing_built(model):
    """`model` with its KerasHub preprocessing layers that have no `build` of their own marked built.

    KerasHub means them to be built at creation, but its check (`hasattr(self, "build")`) is true for
    every Keras layer, so a tokenizer or packer that was never called stays unbuilt. Keras then counts
    the whole model unbuilt and traces it symbolically at every `train_on_batch`, `fit`, `evaluate`
    and `predict` call (`Trainer._symbolic_build`), also when the preprocessor is set aside for
    token-id inputs. On JAX that retrace took 0.5 s (LoRA) to 1 s (injected) of every SmolLM2
    `train_on_batch`. Marking them built is what calling their (inherited, empty) `build` would do."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, PreprocessingLayer) and not layer.built and type(layer).build is keras.layers.Layer.build:
            layer.built = True
    return model


def pooling_of(classifier):
    """How `classifier` reads a text: "mean" (`MeanPooledTextClassifier`) or "cls" (KerasHub's own)."""
    return "mean" if isinstance(classifier, MeanPooledTextClassifier) else "cls"


def with_pooling(classifier, pooling):
    """`classifier` (a `TextClassifier` as `load` makes it, not injected) with the head reading the text
    by `pooling` ("cls" or "mean"): a new classifier over the same backbone and preprocessor, with a new
    head; `classifier` itself when it already pools so. Inject after choosing the pooling."""
    _check_pooling(pooling, "classifier")
    if pooling_of(classifier) == pooling:
        return classifier
    if type(classifier).__name__.startswith("Injected"):
        raise ValueError(f"with_pooling: this {type(classifier).__name__} is injected; choose the pooling first "
                         "(load(..., pooling=...)), then inject.")
    if pooling == "mean":
        task_cls = MeanPooledTextClassifier
    else:
        task_cls = _task_class(keras_hub.models.TextClassifier, classifier.backbone, type(classifier.backbone).__name__,
                               "classifier")
    return preprocessing_built(task_cls(backbone=classifier.backbone, preprocessor=classifier.preprocessor,
                                        num_classes=classifier.num_classes, dropout=classifier.dropout))


def resolve_preset(spec):
    """What KerasHub's `from_preset` gets for `spec`: a local folder (as a string) or the spec itself.

    Built-in names and `.gguf` files become folders (GGUF files are converted once and cached);
    anything that is not a local path is passed through as a KerasHub preset name or handle.
    """
    spec = os.fspath(spec)
    if spec in BUILTIN_MODELS:
        return str(builtin_preset(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(converted_gguf(path))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(
            f"spec={spec!r} is a file but not a `.gguf` file. Pass a `.gguf` file, a Hugging Face or "
            "KerasHub preset folder, a built-in name or a KerasHub preset name."
        )
    if "://" not in spec and (spec.endswith(".gguf") or spec.startswith((".", "~")) or os.sep in spec):
        raise ValueError(
            f"spec={spec!r} looks like a path but does not exist. Built-in names: "
            f"{sorted(BUILTIN_MODELS)}; preset handles look like 'hf://owner/name' or 'kaggle://...'."
        )
    return spec


def _check_pooling(pooling, task):
    if pooling is None:
        return
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}. Use None for the checkpoint's own pooling.")
    if task != "classifier":
        raise ValueError(f"pooling={pooling!r} is a classifier setting; got task={task!r}. Pass task='classifier', "
                         "or drop pooling.")


def _check_arguments(spec, task, num_classes, sequence_length, pooling):
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string or path; got {type(spec).__name__}: {spec!r}.")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}. Use None for the backbone.")
    if task == "classifier":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"task='classifier' needs num_classes, an integer >= 2; got num_classes={num_classes!r}."
            )
    elif num_classes is not None:
        raise ValueError(f"num_classes={num_classes!r} is only used with task='classifier'; got task={task!r}.")
    _check_pooling(pooling, task)
    if sequence_length is not None:
        check_positive_int(sequence_length, "sequence_length", "load", allow_none=True)
        if task is None:
            raise ValueError(
                f"sequence_length={sequence_length} is a preprocessor setting and task=None has no "
                "preprocessor. Pass task='causal_lm' or 'classifier', or drop sequence_length."
            )


def _read_json(folder, name):
    path = Path(folder) / name
    if not path.is_file():  # also the case for preset names, which are not folders
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_config(preset):
    config = _read_json(preset, "config.json")
    # A KerasHub preset folder has a config.json too, without `model_type`.
    return config if "model_type" in config else {}


def _tokenizer_config(preset):
    return _read_json(preset, "tokenizer_config.json") if _hf_config(preset) else {}


def _tokenizer_fixes(preset, hf_config):
    """Tokenizer keyword arguments KerasHub's converter leaves out for a Hugging Face folder."""
    if hf_config.get("model_type") not in _WORDPIECE_ACCENTS:
        return {}
    config = _read_json(preset, "tokenizer_config.json")
    strip = config.get("strip_accents")
    # Hugging Face: strip_accents=None means "strip when lowercasing".
    return {"strip_accents": bool(config.get("do_lower_case", True) if strip is None else strip)}


def _task_class(base, backbone, spec, task):
    """The KerasHub `base` subclass (e.g. `Llama3CausalLM`) made for `type(backbone)`."""
    matches = [
        cls
        for cls in vars(keras_hub.models).values()
        if isinstance(cls, type) and issubclass(cls, base) and cls.backbone_cls is type(backbone)
    ]
    if not matches:
        raise ValueError(
            f"KerasHub has no {base.__name__} for {type(backbone).__name__} (spec={os.fspath(spec)!r}, "
            f"task={task!r}). Use task=None for the backbone, or a model family that has one "
            "(causal_lm: Llama, Gemma, GPT-2, ...; classifier: BERT, RoBERTa, ...)."
        )
    return matches[0]


def drop_start_token(preprocessor):
    """Make training and `generate` both pack without a start token (KerasHub's generate ignores
    `add_start_token` and uses the packer's `start_value`)."""
    preprocessor.add_start_token = False
    preprocessor.build(None)
    preprocessor.packer.start_value = None
