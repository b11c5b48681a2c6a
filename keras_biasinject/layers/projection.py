"""What an adapter needs to know about the Dense or EinsumDense it wraps.

A projection maps `x` to `activation(x K + b)`. For `Dense`, `K` is `[in, units]`; for
`EinsumDense` it is any kernel in the layer's equation, e.g. `abc,cde->abde` (KerasHub's attention
query/key/value, kernel `[hidden, heads, head_dim]`) or `abcd,cde->abe` (its output projection).
The output's *feature axes* are those the kernel produces (`(heads, head_dim)`, `(hidden,)`); the
axes before them are batch-like (`batch`, `seq`) and are where controls may vary.

Low-rank factors follow KerasHub's `enable_lora`: `A` has the kernel's shape with its last axis
replaced by the rank, `B` is `[rank, kernel.shape[-1]]`, so `A B` has the kernel's shape.
"""

import keras
from keras import ops

_FREE_LETTER = "r"  # the rank axis in the low-rank equations


def layer_path(layer):
    """The layer's path in its model (`decoder_3/attention/query`), or its name before it has one."""
    return getattr(layer, "path", None) or getattr(layer, "name", None) or type(layer).__name__


class Projection:
    """A read-only view of a Dense or EinsumDense: its pre-activation output and low-rank equations."""

    def __init__(self, layer, owner):
        if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            raise ValueError(
                f"{owner}: adapters wrap Dense or EinsumDense layers; layer "
                f"'{layer_path(layer)}' is {type(layer).__name__}. Wrap the projection "
                "inside it instead (for example its `_query_dense`)."
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"{owner}: layer '{layer_path(layer)}' already has Keras LoRA enabled "
                "(`enable_lora`). Use either Keras LoRA or this adapter, not both: rebuild the "
                "layer without `enable_lora`."
            )
        self.layer = layer
        self.is_dense = isinstance(layer, keras.layers.Dense)
        self.linear = layer.activation in (None, keras.activations.linear)
        if layer.quantization_mode is not None and not self.linear:
            raise ValueError(
                f"{owner}: layer '{layer_path(layer)}' is quantized ({layer.quantization_mode}) and has "
                f"activation {layer.activation.__name__}; adapters need its pre-activation output. "
                "Wrap the layer before quantizing it."
            )
        if self.is_dense:
            self.feature_letters = "o"
            self._eq_a = self._eq_b = None
        else:
            self._parse_equation(layer.equation, owner)

    def _parse_equation(self, equation, owner):
        inputs, out = equation.replace(" ", "").split("->")
        x_spec, k_spec = inputs.split(",")
        last = k_spec[-1]
        features = "".join(ch for ch in out if ch in k_spec)
        if _FREE_LETTER in equation or "." in k_spec or not out.endswith(features) or (
            not features.endswith(last)
        ):
            raise ValueError(
                f"{owner}: EinsumDense '{layer_path(self.layer)}' has equation '{equation}'; adapters "
                "support equations whose kernel axes end the output (e.g. 'abc,cde->abde', "
                "'abcd,cde->abe') and that do not use the letter 'r'."
            )
        self.feature_letters = features
        out_r = out[:-1] + _FREE_LETTER
        self._eq_a = f"{x_spec},{k_spec[:-1]}{_FREE_LETTER}->{out_r}"
        # `x A` as one 2-D matmul when x's contracted axes end x, start A in the same order, and the output is
        # x's other axes then A's ("abc,cdr->abdr", "abcd,cdr->abr"): its gradient is two matmuls, where the
        # einsum's batched matmul adds broadcast reductions (a smaller training graph, and no per-example dA).
        contracted = "".join(ch for ch in x_spec if ch in k_spec[:-1])
        n = len(contracted)
        a_spec = k_spec[:-1] + _FREE_LETTER
        self._flat_a = n if (n and x_spec.endswith(contracted) and a_spec.startswith(contracted)
                             and out_r == x_spec[:-n] + a_spec[n:]) else 0
        self._eq_b = f"{out_r},{_FREE_LETTER}{last}->{out}"
        self._eq_merge = f"{k_spec[:-1]}{_FREE_LETTER},{_FREE_LETTER}{last}->{k_spec}"

    @property
    def dtype_policy(self):
        """The layer's float policy (for a quantized layer, the policy it was quantized from)."""
        policy = self.layer.dtype_policy
        if policy.quantization_mode is None:
            return policy
        compute, variable = policy.compute_dtype, policy.variable_dtype
        return keras.DTypePolicy(compute if compute == variable else f"mixed_{compute}")

    @property
    def kernel_shape(self):
        return tuple(self.layer.kernel.shape)

    @property
    def feature_shape(self):
        """Output axes produced by the kernel, e.g. `(units,)` or `(heads, head_dim)`."""
        if self.is_dense:
            return (self.layer.units,)
        k_spec = self.layer.equation.split(",")[1].split("->")[0]
        return tuple(self.kernel_shape[k_spec.index(ch)] for ch in self.feature_letters)

    def lora_shapes(self, rank):
        """Shapes of `A` and `B` for a low-rank update of the kernel."""
        return self.kernel_shape[:-1] + (rank,), (rank, self.kernel_shape[-1])

    def pre_activation(self, x):
        """`x K + b`, computed exactly as the layer computes it before its activation."""
        layer = self.layer
        if self.linear:
            return layer(x)
        if self.is_dense:
            y = ops.matmul(x, layer.kernel)
        else:
            y = ops.einsum(layer.equation, x, layer.kernel)
        if layer.bias is not None:
            y = ops.add(y, layer.bias)
        return y

    def project_a(self, x, a):
        """`x A`: the input projected to the rank axis, `[..., rank]`."""
        if self.is_dense:
            return ops.matmul(x, a)
        n = self._flat_a
        lead = tuple(x.shape[:-n]) if n else ()
        if not n or not lead or None in lead[1:]:  # the einsum: other equations, no batch axis, unknown axes after it
            return ops.einsum(self._eq_a, x, a)
        inner = 1
        for size in a.shape[:n]:
            inner *= size
        h = ops.matmul(ops.reshape(x, (-1, inner)), ops.reshape(a, (inner, -1)))  # (B * T, rest of A)
        return ops.reshape(h, (-1,) + lead[1:] + tuple(a.shape[n:]))

    def project_b(self, h, b):
        """`h B`: rank-axis activations mapped to the output."""
        return ops.matmul(h, b) if self.is_dense else ops.einsum(self._eq_b, h, b)

    def kernel_delta(self, a, b):
        """`A B` in the kernel's shape."""
        return ops.matmul(a, b) if self.is_dense else ops.einsum(self._eq_merge, a, b)
