"""What this package needs to reach inside a KerasHub model: its backbone, its config (with a
KerasHub 0.32 omission repaired) and its preprocessor set aside for a while."""

import contextlib

import keras_hub


def backbone_of(model, owner="inject"):
    """The `keras_hub.models.Backbone` of `model` (a Backbone, or a Task that holds one)."""
    if isinstance(model, keras_hub.models.Backbone):
        return model
    if isinstance(model, keras_hub.models.Task) and isinstance(getattr(model, "backbone", None), keras_hub.models.Backbone):
        return model.backbone
    raise ValueError(
        f"{owner}: expected a KerasHub Backbone or Task (CausalLM, TextClassifier, ...); got "
        f"{type(model).__name__}. Load the model with keras_hub (e.g. `keras_hub.models.GPT2Backbone.from_preset`)."
    )


def with_tied_embeddings(model, config):
    """`config` plus `tie_word_embeddings` when `model` has that attribute and the config lacks it.

    KerasHub 0.32's Llama backbones take `tie_word_embeddings` but leave it out of `get_config`, so a
    tied model (SmolLM2) would come back untied, with one weight more."""
    if hasattr(model, "tie_word_embeddings") and "tie_word_embeddings" not in config:
        config = {**config, "tie_word_embeddings": bool(model.tie_word_embeddings)}
    return config


@contextlib.contextmanager
def preprocessor_detached(model):
    """Sets `model.preprocessor` to None inside the block and always puts it back.

    For inputs that are token ids already (`fit` on a tokenized `tf.data` pipeline, an export, whose
    tokenizers would need tensorflow-text ops that TF Serving lacks)."""
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        model.preprocessor = None
    try:
        yield model
    finally:
        if preprocessor is not None:
            model.preprocessor = preprocessor
