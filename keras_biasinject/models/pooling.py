"""How a text classifier reads a whole text from its backbone: KerasHub's pooled [CLS] output, or the
mean over the sequence output's real tokens (what sentence-transformers models were trained with).

- `MaskedMeanPooling`: `mean_t h[t]` over the tokens where `padding_mask` is true.
- `MeanPooledTextClassifier`: a KerasHub `TextClassifier` whose head (dropout, Dense "logits") reads
  that mean instead of the pooled [CLS] output. It stays a functional Keras model over the backbone, so
  `inject`, `fit`, `.keras` saving and the frozen-base checks work on it as on KerasHub's own.
- `checkpoint_pooling(folder)`: "mean" or "cls" when a checkpoint's files say which pooling it was trained
  with (a sentence-transformers folder's `1_Pooling/config.json`), else None.
"""

import json
from pathlib import Path

import keras
import keras_hub
from keras import ops

POOLINGS = ("cls", "mean")  # "cls": KerasHub's own classifier (its pooled [CLS] output); "mean": masked mean


@keras.saving.register_keras_serializable(package="keras_biasinject")
class MaskedMeanPooling(keras.layers.Layer):
    """The mean of a sequence over its real tokens: `y = sum_t m[t] h[t] / max(sum_t m[t], 1)`.

    Args:
        **kwargs: Keras layer arguments (`name`, `dtype`).

    Call arguments:
        sequence: `[batch, seq, hidden]`, e.g. a backbone's `sequence_output`.
        padding_mask: `[batch, seq]`, true (or 1) on real tokens; None averages every token.

    Output: `[batch, hidden]`. A row with no real token gives zeros.

    Example:
        >>> h = np.ones((2, 3, 4), "float32"); m = np.array([[1, 1, 0], [1, 0, 0]], bool)
        >>> MaskedMeanPooling()(h, m).shape
        (2, 4)
    """

    def call(self, sequence, padding_mask=None):
        if padding_mask is None:
            return ops.mean(sequence, axis=1)
        mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), -1)  # (B, T, 1)
        total = ops.sum(sequence * mask, axis=1)  # (B, C)
        count = ops.maximum(ops.sum(mask, axis=1), ops.cast(1, sequence.dtype))  # (B, 1)
        return total / count

    def compute_output_shape(self, sequence_shape, padding_mask_shape=None):
        return (sequence_shape[0], sequence_shape[-1])


@keras.saving.register_keras_serializable(package="keras_biasinject")
class MeanPooledTextClassifier(keras_hub.models.TextClassifier):
    """A KerasHub text classifier over the mean of the backbone's sequence output (non-padding tokens).

    `logits = Dense(dropout(MaskedMeanPooling(sequence_output, padding_mask)))`; the layers are named as
    in KerasHub's BERT classifier (`classifier_dropout`, `logits`), so recipes train the head the same way.

    Args:
        backbone: a KerasHub encoder backbone with `token_ids` and `padding_mask` inputs whose output is
            the sequence (`[batch, seq, hidden]`) or a dict holding `sequence_output`.
        num_classes: the number of classes.
        preprocessor: a `TextClassifierPreprocessor`, or None for token-id inputs.
        activation: the head's activation; None gives logits.
        dropout: the rate of the dropout before the head.

    Input: the backbone's inputs dict (or strings, with a preprocessor). Output: `[batch, num_classes]`.

    Example:
        >>> clf = load("minilm-l6", task="classifier", num_classes=2, pooling="mean")
        >>> type(clf).__name__
        'MeanPooledTextClassifier'
    """

    def __init__(self, backbone, num_classes, preprocessor=None, activation=None, dropout=0.1, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooling_layer = MaskedMeanPooling(dtype=backbone.dtype_policy, name="mean_pooling")
        self.output_dropout = keras.layers.Dropout(dropout, dtype=backbone.dtype_policy, name="classifier_dropout")
        self.output_dense = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),  # as KerasHub's BERT head
            activation=activation,
            dtype=backbone.dtype_policy,
            name="logits",
        )

        # === Functional Model ===
        inputs = backbone.input
        outputs = backbone(inputs)
        sequence = outputs["sequence_output"] if isinstance(outputs, dict) else outputs  # (B, T, C)
        mask = inputs.get("padding_mask") if isinstance(inputs, dict) else None  # (B, T); None: every token
        pooled = self.pooling_layer(sequence, mask)  # (B, C)
        logits = self.output_dense(self.output_dropout(pooled))  # (B, num_classes)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.activation = keras.activations.get(activation)
        self.dropout = dropout

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "activation": keras.activations.serialize(self.activation),
            "dropout": self.dropout,
        }


def checkpoint_pooling(folder):
    """"mean" or "cls" when `folder` is a sentence-transformers checkpoint whose Pooling module says
    so (`pooling_mode_mean_tokens` / `pooling_mode_cls_token`); None otherwise (another pooling mode,
    no such files, or a preset name that is not a folder)."""
    folder = Path(folder)
    config = _pooling_config(folder)
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _pooling_config(folder):
    """The sentence-transformers Pooling module's config.json in `folder` ({} if none)."""
    candidates = []
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = []
        candidates += [e.get("path", "") for e in entries if isinstance(e, dict) and str(e.get("type", "")).endswith(".Pooling")]
    candidates.append("1_Pooling")  # the usual place, also when modules.json is missing
    for sub in candidates:
        path = folder / sub / "config.json"
        if sub and path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                return config
    return {}
