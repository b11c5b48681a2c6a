"""`LoRABiasAdapter`: a low-rank adapter whose strength a control vector sets, plus a control bias.

It wraps a frozen Dense or EinsumDense (any projection of a KerasHub transformer block); the
control turns each rank component up, down, off or around, per example or per token. Its weights
start so that the output is the base output bit for bit, and with `gate="control"` the neutral
control gives the base output exactly even after training.
"""

import keras
from keras import ops

from keras_biasinject.layers import control as control_lib
from keras_biasinject.layers.adapter import ControlAdapter
from keras_biasinject.layers.checks import check_positive_int, check_positive_number
from keras_biasinject.layers.projection import layer_path

GATES = {"always": 1.0, "control": 0.0}  # gate name -> LoRA strength at the neutral control


@keras.saving.register_keras_serializable(package="keras_biasinject")
class LoRABiasAdapter(ControlAdapter):
    """A low-rank adapter around a frozen Dense or EinsumDense whose strength the control sets.

    `y = base(x) + (alpha / r) ((x A) * (g + (c - neutral) U)) B + (c - neutral) V`, with `g` = 1
    for `gate="always"` and 0 for `gate="control"`, and `B` and `V` starting at zero.

    Why this form. `x A` projects the input to `r` rank components, as in LoRA; the control sets
    each component's strength `g + (c - neutral) U` (U: `[control_dim, r]`, starting at ones), so a
    control can turn the learned update up, down, off or reverse it, per example or per token; `V`
    (`[control_dim, *features]`) adds a control-dependent bias, the "extra input nodes". Since `B`
    and `V` start at zero, the output at insertion is the base output bit for bit for any control.
    Both get a non-zero gradient on the first step with a non-neutral control (`U` starts at ones,
    not zero, so the `gate="control"` product never stalls at zero).

    - `gate="always"`: at the neutral control the adapter is a plain LoRA update; other controls
      scale it (`c - neutral = 1` doubles it at initialisation, `-1` cancels it).
    - `gate="control"`: every added term is a multiple of `c - neutral`, so the neutral control gives
      the frozen base output exactly, even after training: an exact off switch.

    `merge(control)` folds the update for one fixed control into the base kernel (and bias) for
    zero-overhead inference; `unmerge()` restores the original weights bit for bit.

    Args:
        base_layer: a built `Dense` or `EinsumDense`; it is frozen.
        rank: rank `r` of the update.
        control_dim: number of control inputs `k`.
        alpha: scale numerator; the update is scaled by `alpha / rank`. Defaults to `rank`.
        gate: "always" or "control" (see above).
        neutral: the neutral control: a float or `k` floats.
        lora_a_initializer: initializer of `A` (KerasHub's default, "he_uniform").
        control_gain_initializer: initializer of `U`. Keep it non-zero for `gate="control"`.

    Call arguments:
        inputs: the base layer's input.
        control: `[control_dim]`, `[batch, control_dim]` or `[batch, seq, control_dim]`; when
            omitted, the enclosing `control_scope`'s control, else the neutral control.

    Output shape: the base layer's.

    Example:
    >>> query = keras.layers.EinsumDense("abc,cde->abde", (None, 4, 8)); query.build((2, 5, 16))
    >>> adapter = LoRABiasAdapter(query, rank=4, control_dim=1, gate="control")
    >>> y = adapter(x, control=np.array([[1.0], [-1.0]]))    # (2, 5, 4, 8)
    >>> adapter.merge([1.0]); y1 = adapter(x)                 # the update for c = 1, folded in
    >>> adapter.unmerge()                                     # the original kernel, bit for bit
    """

    kind = "lora_bias"
    name_suffix = "_lora_bias"
    weight_names = ("lora_a", "lora_b", "control_gain", "control_kernel")

    def __init__(
        self,
        base_layer,
        rank,
        control_dim,
        alpha=None,
        gate="always",
        neutral=0.0,
        lora_a_initializer="he_uniform",
        control_gain_initializer="ones",
        **kwargs,
    ):
        name = self.__class__.__name__
        if not base_layer.built:
            raise ValueError(
                f"{name}: layer '{layer_path(base_layer)}' is not built, so it has no weights to adapt. "
                "Call it on an input (or `layer.build(input_shape)`) before wrapping it."
            )
        rank = check_positive_int(rank, "rank", name)
        if gate not in GATES:
            raise ValueError(f"{name}: `gate` must be one of {sorted(GATES)}. Got gate={gate!r}.")
        alpha = check_positive_number(alpha, "alpha", name, allow_none=True)  # finite: inf or NaN gives NaN outputs
        kwargs.setdefault("name", self.default_name(base_layer))
        super().__init__(base_layer, control_dim, neutral, **kwargs)
        self.freeze_base()
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.gate = gate
        self.lora_a_initializer = keras.initializers.get(lora_a_initializer)
        self.control_gain_initializer = keras.initializers.get(control_gain_initializer)
        self.build()  # the base is built, so every weight's shape is known

    @classmethod
    def for_injection(cls, layer, config, **kwargs):
        return cls(layer, rank=config.rank, control_dim=config.control_dim, alpha=config.alpha, gate=config.gate,
                   neutral=config.neutral, **kwargs)

    def build(self, input_shape=None):
        a_shape, b_shape = self.projection.lora_shapes(self.rank)
        self.lora_a = self.add_weight(name="lora_a", shape=a_shape, initializer=self.lora_a_initializer)
        self.lora_b = self.add_weight(name="lora_b", shape=b_shape, initializer="zeros")
        self.control_gain = self.add_weight(
            name="control_gain", shape=(self.control_dim, self.rank), initializer=self.control_gain_initializer
        )
        self.add_control_kernel("zeros")

    @property
    def scale(self):
        return self.alpha / self.rank

    def adapted(self, inputs, control, under=None):
        projection = self.projection
        if control is None and self.gate == "control":  # neutral control: the frozen base
            return self.base_output(inputs, under)

        y = self.base_output(inputs, under)  # (B, ..., *features)
        h = projection.project_a(inputs, self.lora_a)  # (B, ..., r)
        if control is None:  # neutral control, gate "always": strength 1
            gated = h
        else:
            d = self.centred(control, y)  # (lead..., k)
            strength = self.strength(d)  # (lead..., r)
            gated = ops.multiply(h, control_lib.align(strength, len(d.shape) - 1, len(h.shape)))
        update = self.scaled(projection.project_b(gated, self.lora_b), y.dtype)
        y = ops.add(y, update)
        if control is not None:
            y = ops.add(y, self.control_bias(d, y))
        return y

    def strength(self, centred):
        """`g + (c - neutral) U`, each rank component's strength. For `gate="control"` (`g` = 0) the
        product alone: adding 0 changes no value (at most the sign of a zero), and leaves one op fewer
        per adapter in the graph."""
        product = ops.matmul(centred, self.control_gain)
        return product if GATES[self.gate] == 0.0 else ops.add(GATES[self.gate], product)

    def scaled(self, update, dtype):
        """`update * (alpha / r)`. At the default `alpha = r` the factor is 1 and is left out: the values are
        the same bit for bit, and training keeps no output-sized product (and its saved input) per adapter."""
        return update if self.scale == 1.0 else ops.multiply(update, ops.cast(self.scale, dtype))

    def hoist(self, control):
        """`(strength, bias)` for a per-example `control` `[batch, k]`: `g + (c - neutral) U` (`[batch, r]`)
        and `(c - neutral) V` (`[batch, *features]`), each with a unit axis for the sequence inserted
        after the batch axis, as `adapted` aligns them for a `[batch, seq, ...]` input."""
        control = self.own_control(control)
        if control is None or len(control.shape) != 2:
            return None
        out_rank = 2 + len(self.projection.feature_shape)  # (B, T, *features)
        d = control_lib.centred_control(control, self.neutral, self.control_dim, 2, self.compute_dtype, self.path)  # (B, k)
        strength = self.strength(d)  # (B, r)
        return control_lib.align(strength, 1, out_rank), control_lib.control_term(d, self.control_kernel, out_rank)

    def adapted_hoisted(self, inputs, control, hoisted, under=None):
        """`adapted` with the control's terms from `hoist`: the same operations on the same values, minus
        those that depend on the control alone. An input whose leading axes are not (batch, seq) takes
        the plain path (the terms' alignment assumes them)."""
        strength, bias = hoisted
        y = self.base_output(inputs, under)  # (B, T, *features)
        if len(y.shape) != len(bias.shape):  # e.g. tokens flattened to [B * T, features]
            return self.adapted(inputs, self.own_control(control), under)
        h = self.projection.project_a(inputs, self.lora_a)  # (B, T, ..., r)
        gated = ops.multiply(h, strength)
        update = self.scaled(self.projection.project_b(gated, self.lora_b), y.dtype)
        return ops.add(ops.add(y, update), bias)

    def merged_kernel(self, centred):
        """`K + (alpha / r) A diag(g + (c - neutral) U) B`."""
        strength = self.strength(centred)  # (r,)
        delta = self.projection.kernel_delta(ops.multiply(self.lora_a, strength), self.lora_b)
        return ops.add(self.base_layer.kernel, ops.multiply(delta, self.scale))

    @classmethod
    def weight_layout(cls, weight, kernel_axes, rank):
        """`A` (the kernel's shape, last axis -> rank) like the kernel's input axes, `B` (`[rank,
        out]`) like its last axis; `U` whole; `V` as for every kind."""
        if weight == "lora_a":
            return list(kernel_axes[:-1]) + [None]
        if weight == "lora_b":
            return [None, kernel_axes[-1]]
        return super().weight_layout(weight, kernel_axes, rank)

    def get_config(self):
        return {
            **super().get_config(),
            "rank": self.rank,
            "alpha": self.alpha,
            "gate": self.gate,
            "lora_a_initializer": keras.initializers.serialize(self.lora_a_initializer),
            "control_gain_initializer": keras.initializers.serialize(self.control_gain_initializer),
        }
