import keras
from keras import ops

from keras_biasinject.layers import control as control_lib
from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.layers.projection import Projection, layer_path

GATES = {"always": 1.0, "control": 0.0}  # gate name -> LoRA strength at the neutral control


@keras.saving.register_keras_serializable(package="keras_biasinject")
class LoRABiasAdapter(keras.layers.Layer):
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
        projection = Projection(base_layer, name)
        rank = check_positive_int(rank, "rank", name)
        control_dim = check_positive_int(control_dim, "control_dim", name)
        if gate not in GATES:
            raise ValueError(f"{name}: `gate` must be one of {sorted(GATES)}. Got gate={gate!r}.")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"{name}: `alpha` must be a positive number or None. Got alpha={alpha!r}.")
        neutral = control_lib.check_neutral(neutral, control_dim, name)
        kwargs.setdefault("dtype", projection.dtype_policy)
        kwargs.setdefault("name", f"{base_layer.name}_lora_bias")
        super().__init__(**kwargs)
        base_layer.trainable = False
        self.base_layer = base_layer
        self.projection = projection
        self.rank = rank
        self.control_dim = control_dim
        self.alpha = float(alpha if alpha is not None else rank)
        self.gate = gate
        self.neutral = neutral
        self.lora_a_initializer = keras.initializers.get(lora_a_initializer)
        self.control_gain_initializer = keras.initializers.get(control_gain_initializer)
        self._merged = None  # (kernel, bias, offset) saved by merge(), or None
        self.build()  # the base is built, so every weight's shape is known

    def build(self, input_shape=None):
        a_shape, b_shape = self.projection.lora_shapes(self.rank)
        self.lora_a = self.add_weight(name="lora_a", shape=a_shape, initializer=self.lora_a_initializer)
        self.lora_b = self.add_weight(name="lora_b", shape=b_shape, initializer="zeros")
        self.control_gain = self.add_weight(
            name="control_gain", shape=(self.control_dim, self.rank), initializer=self.control_gain_initializer
        )
        self.control_kernel = self.add_weight(
            name="control_kernel", shape=(self.control_dim,) + self.projection.feature_shape, initializer="zeros"
        )

    @property
    def scale(self):
        return self.alpha / self.rank

    @property
    def merged(self):
        return self._merged is not None

    def call(self, inputs, control=None):
        projection = self.projection
        if self._merged is not None:
            if control is not None:
                raise ValueError(
                    f"Layer '{self.path}' is merged for one fixed control and ignores `control`. "
                    "Call `unmerge()` to use per-request controls again."
                )
            y = projection.pre_activation(inputs)
            offset = self._merged[2]
            return self._activate(y if offset is None else ops.add(y, ops.cast(offset, y.dtype)))

        control = control_lib.current_control() if control is None else control
        if control is None and self.gate == "control":  # neutral control: the frozen base
            return self._activate(projection.pre_activation(inputs))

        y = projection.pre_activation(inputs)  # (B, ..., *features)
        h = projection.project_a(inputs, self.lora_a)  # (B, ..., r)
        if control is None:  # neutral control, gate "always": strength 1
            gated = h
        else:
            lead = len(y.shape) - len(projection.feature_shape)
            d = control_lib.centred_control(control, self.neutral, self.control_dim, lead, self.compute_dtype, self.path)
            strength = ops.add(GATES[self.gate], ops.matmul(d, self.control_gain))  # (lead..., r)
            gated = ops.multiply(h, control_lib.align(strength, len(d.shape) - 1, len(h.shape)))
        update = ops.multiply(projection.project_b(gated, self.lora_b), ops.cast(self.scale, y.dtype))
        y = ops.add(y, update)
        if control is not None:
            y = ops.add(y, control_lib.control_term(d, self.control_kernel, len(y.shape)))
        return self._activate(y)

    def _activate(self, y):
        return y if self.projection.linear else self.base_layer.activation(y)

    def merge(self, control=None):
        """Folds the update for one fixed control (`[control_dim]`, default neutral) into the base.

        The kernel becomes `K + (alpha / r) A diag(g + (c - neutral) U) B`; the bias becomes
        `b + (c - neutral) V` when the base has a bias over all feature axes, otherwise that offset
        is kept and added on each call. Call `unmerge()` to restore the original weights exactly.
        """
        base = self.base_layer
        if self._merged is not None:
            raise ValueError(f"Layer '{self.path}' is already merged. Call `unmerge()` first.")
        if base.quantization_mode is not None:
            raise ValueError(
                f"Layer '{self.path}': the base is quantized ({base.quantization_mode}); a low-rank "
                "update cannot be folded into quantized weights. Use the adapter unmerged."
            )
        if control is None:
            control = ops.zeros((self.control_dim,)) + ops.convert_to_tensor(self.neutral, "float32")
        d = control_lib.centred_control(control, self.neutral, self.control_dim, 0, "float32", self.path)
        strength = ops.add(GATES[self.gate], ops.matmul(d, self.control_gain))  # (r,)
        delta = self.projection.kernel_delta(ops.multiply(self.lora_a, strength), self.lora_b)
        offset = control_lib.control_term(d, self.control_kernel, len(self.projection.feature_shape))
        saved_kernel = ops.copy(base.kernel.value)
        saved_bias = None if base.bias is None else ops.copy(base.bias.value)
        base.kernel.assign(ops.add(base.kernel, ops.multiply(delta, self.scale)))
        if base.bias is not None and tuple(base.bias.shape) == tuple(offset.shape):
            base.bias.assign(ops.add(base.bias, offset))
            offset = None
        self._merged = (saved_kernel, saved_bias, offset)

    def unmerge(self):
        """Restores the kernel and bias saved by `merge()`, bit for bit."""
        if self._merged is None:
            raise ValueError(f"Layer '{self.path}' is not merged; there is nothing to unmerge.")
        kernel, bias, _ = self._merged
        self.base_layer.kernel.assign(kernel)
        if bias is not None:
            self.base_layer.bias.assign(bias)
        self._merged = None

    def save_own_variables(self, store):
        if self._merged is not None:
            raise ValueError(
                f"Layer '{self.path}' is merged: saving now would store the merged kernel as the "
                "base kernel and apply the update twice on reload. Call `unmerge()` before saving."
            )
        super().save_own_variables(store)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "base_layer": keras.saving.serialize_keras_object(self.base_layer),
            "rank": self.rank,
            "control_dim": self.control_dim,
            "alpha": self.alpha,
            "gate": self.gate,
            "neutral": self.neutral,
            "lora_a_initializer": keras.initializers.serialize(self.lora_a_initializer),
            "control_gain_initializer": keras.initializers.serialize(self.control_gain_initializer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(config["base_layer"])
        return cls(**config)
