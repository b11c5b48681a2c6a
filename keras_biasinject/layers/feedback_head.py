"""`FeedbackHead`: extra output nodes that read the model's own hidden states.

The extended output layer of the method: a small head beside the model's own output, whose reading
of what the model just produced (for example "how positive is this text", trained from review labels)
becomes feedback for the next control (`DecayFeedback`, `keras_biasinject.FeedbackLoop`). It reads
hidden states the model computes anyway, so it changes no existing output and costs one small matmul.
"""

import keras
from keras import ops

from keras_biasinject.layers.checks import check_positive_int

POOLINGS = ("last", "mean", "first")  # last non-padding token, masked mean, first token ([CLS])
ACTIVATIONS = {  # activation -> the range of a reading, used to refuse unreachable targets
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "linear": (float("-inf"), float("inf")),
}


@keras.saving.register_keras_serializable(package="keras_biasinject")
class FeedbackHead(keras.layers.Layer):
    """Reads hidden states into `feedback_dim` numbers: `r_t = activation(h_t W + b)`, `r = pool(r_t)`.

    Per token (`per_token=True`, how a causal LM trains it: every prefix predicts the label) or
    pooled over the sequence (`pooling`: the reading at the last non-padding token, the masked mean
    of the readings, or the reading at the first token).

    Args:
        feedback_dim: number of output nodes.
        pooling: "last" (default; a causal LM's summary of the whole text), "mean" or "first".
        activation: "sigmoid" (default; a probability, trained with binary cross-entropy), "tanh"
            or "linear". It sets the range a loop target must lie in (`reading_range`).
        kernel_initializer: initializer of `W` (`b` starts at zero).

    Call arguments:
        hidden: `[batch, seq, hidden_dim]`.
        padding_mask: `[batch, seq]` (1 for real tokens); default all ones. Padding is on the right.
        per_token: return `[batch, seq, feedback_dim]` instead of `[batch, feedback_dim]`.

    Example:
    >>> head = FeedbackHead(1)                                   # P(positive), say
    >>> h = np.random.rand(2, 5, 16).astype("float32")
    >>> head(h, padding_mask=np.array([[1, 1, 1, 0, 0], [1] * 5])).shape      # (2, 1)
    >>> head(h, per_token=True).shape                             # (2, 5, 1)
    """

    def __init__(self, feedback_dim=1, pooling="last", activation="sigmoid", kernel_initializer="glorot_uniform", **kwargs):
        kwargs.setdefault("dtype", "float32")  # a reading feeds a state that accumulates: keep float32
        kwargs.setdefault("name", "feedback_head")
        super().__init__(**kwargs)
        name = self.__class__.__name__
        self.feedback_dim = check_positive_int(feedback_dim, "feedback_dim", name)
        if pooling not in POOLINGS:
            raise ValueError(f"{name}: `pooling` must be one of {list(POOLINGS)}. Got pooling={pooling!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: `activation` must be one of {list(ACTIVATIONS)}. Got activation={activation!r}.")
        self.pooling = pooling
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    @property
    def reading_range(self):
        """(low, high): the open interval a reading lies in."""
        return ACTIVATIONS[self.activation]

    def build(self, hidden_shape):
        hidden_dim = hidden_shape[-1]
        if len(hidden_shape) != 3 or hidden_dim is None:
            raise ValueError(
                f"Layer '{self.path}': a feedback head reads hidden states [batch, seq, hidden_dim] with a known "
                f"hidden_dim. Got shape {tuple(hidden_shape)}: attach the head to a model whose backbone returns "
                "a sequence of hidden states (KerasHub text backbones do)."
            )
        self.kernel = self.add_weight(name="kernel", shape=(hidden_dim, self.feedback_dim), initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.feedback_dim,), initializer="zeros")

    def call(self, hidden, padding_mask=None, per_token=False):
        readings = self._read(ops.cast(hidden, self.compute_dtype))  # (B, T, F)
        return readings if per_token else self.pool(readings, padding_mask)

    def pool(self, readings, padding_mask=None):
        """Per-token readings `[batch, seq, F]` -> one per sequence `[batch, F]`, by `pooling`."""
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(readings)[:2], "float32")
        mask = ops.cast(padding_mask, readings.dtype)  # (B, T)
        if self.pooling == "first":
            return readings[:, 0, :]
        if self.pooling == "mean":
            total = ops.sum(ops.multiply(readings, ops.expand_dims(mask, -1)), axis=1)  # (B, F)
            return ops.divide(total, ops.maximum(ops.sum(mask, axis=1, keepdims=True), 1.0))
        # "last": right padding, so the last real token is at (number of real tokens - 1)
        last = ops.maximum(ops.cast(ops.sum(mask, axis=1), "int32") - 1, 0)  # (B,)
        return ops.take_along_axis(readings, ops.reshape(last, (-1, 1, 1)), axis=1)[:, 0, :]

    def _read(self, hidden):
        logits = ops.add(ops.matmul(hidden, self.kernel), self.bias)
        return logits if self.activation == "linear" else getattr(keras.activations, self.activation)(logits)

    def compute_output_shape(self, hidden_shape, padding_mask_shape=None, per_token=False):
        return tuple(hidden_shape[:2] if per_token else hidden_shape[:1]) + (self.feedback_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "feedback_dim": self.feedback_dim,
            "pooling": self.pooling,
            "activation": self.activation,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
