"""`BiasInjectDense`: a dense layer with extra input nodes for a control vector.

The control enters only as a bias, `(c - neutral) V`, through weights that start at zero; built
fresh like `Dense`, or around a built Dense or EinsumDense whose weights it freezes
(`from_layer`). The cheapest adapter kind: `V` alone trains.
"""

import keras
from keras import ops

from keras_biasinject.layers.adapter import ControlAdapter
from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.layers.projection import layer_path


@keras.saving.register_keras_serializable(package="keras_biasinject")
class BiasInjectDense(ControlAdapter):
    """A dense layer with extra input nodes for a control vector.

    `y = activation(x W + b + (c - neutral) V)`, with `V` starting at zero.

    The control `c` enters through its own weights `V` (`[control_dim, units]`), which start at
    exactly zero: the layer's output equals the plain dense layer's bit for bit until `V` is trained,
    and at the neutral control `(c - neutral) V` is zero whatever `V` holds (the proposal's
    "sum of w_i = -b_i": the control nodes contribute nothing at the neutral point).

    Build it fresh like `Dense`, or around an existing built `Dense` or `EinsumDense` with
    `BiasInjectDense.from_layer(layer, control_dim)`, which freezes the layer's weights so that only
    `V` trains. For an EinsumDense, `V` covers the output's feature axes, e.g.
    `[control_dim, heads, head_dim]` for an attention query projection.

    `merge(control)` folds `(c - neutral) V` for one fixed control into the bias (or, where the
    base has no bias over all its output features, keeps it as an offset added on each call);
    `unmerge()` restores the original bias bit for bit.

    Args:
        units: output width of a fresh layer. Leave None when passing `base_layer`.
        control_dim: number of control inputs `k`.
        neutral: the control at which the layer is the plain dense layer: a float or `k` floats.
        activation, use_bias, kernel_initializer, bias_initializer: as for `keras.layers.Dense`
            (fresh layer only).
        control_initializer: initializer of `V`. Keep "zeros" for the zero-impact guarantee.
        base_layer: a `Dense` or `EinsumDense` to inject into instead of creating one.

    Call arguments:
        inputs: `[batch, ..., in]`.
        control: `[control_dim]`, `[batch, control_dim]` or `[batch, seq, control_dim]`. When
            omitted: the control of the enclosing `control_scope`, else the neutral control.

    Output shape: that of the dense layer, `[batch, ..., units]`.

    Example:
    >>> layer = BiasInjectDense(8, control_dim=2)
    >>> x = np.ones((4, 16)); c = np.array([[1.0, 0.0]] * 4)
    >>> y = layer(x, control=c)                       # (4, 8)
    >>> frozen = BiasInjectDense.from_layer(keras.layers.Dense(8), control_dim=2)  # after build
    """

    kind = "bias"
    name_suffix = "_bias_inject"
    weight_names = ("control_kernel",)

    def __init__(
        self,
        units=None,
        control_dim=1,
        neutral=0.0,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        control_initializer="zeros",
        base_layer=None,
        **kwargs,
    ):
        name = self.__class__.__name__
        if base_layer is None:
            base_layer = keras.layers.Dense(
                check_positive_int(units, "units", name),
                activation=activation,
                use_bias=use_bias,
                kernel_initializer=kernel_initializer,
                bias_initializer=bias_initializer,
                dtype=kwargs.get("dtype"),
                name="dense",
            )
        elif units is not None or activation is not None:
            raise ValueError(
                f"{name}: pass either `units` (and `activation`) for a fresh layer or `base_layer`, "
                f"not both. Got units={units!r}, activation={activation!r}, "
                f"base_layer={base_layer.name!r}."
            )
        super().__init__(base_layer, control_dim, neutral, **kwargs)
        self.control_initializer = keras.initializers.get(control_initializer)
        if base_layer.built:  # V's shape is known: create it now, so it can be inspected and trained
            self.build()

    @classmethod
    def from_layer(cls, layer, control_dim, neutral=0.0, **kwargs):
        """Injects a control into a built Dense or EinsumDense, freezing its weights."""
        if not layer.built:
            raise ValueError(
                f"{cls.__name__}.from_layer: layer '{layer_path(layer)}' is not built, so it has no "
                "weights to keep. Call it on an input (or `layer.build(input_shape)`) first."
            )
        kwargs.setdefault("name", cls.default_name(layer))
        wrapped = cls(control_dim=control_dim, neutral=neutral, base_layer=layer, **kwargs)
        wrapped.freeze_base()  # only after every check passed
        return wrapped

    @classmethod
    def for_injection(cls, layer, config, **kwargs):
        return cls.from_layer(layer, control_dim=config.control_dim, neutral=config.neutral, **kwargs)

    def build(self, input_shape=None):
        if not self.base_layer.built:
            self.base_layer.build(input_shape)
        self.add_control_kernel(self.control_initializer)

    @property
    def kernel(self):
        return self.base_layer.kernel

    @property
    def bias(self):
        return self.base_layer.bias

    def adapted(self, inputs, control, under=None):
        y = self.base_output(inputs, under)  # (B, ..., *features)
        if control is None:
            return y
        return ops.add(y, self.control_bias(self.centred(control, y), y))

    def merged_kernel(self, centred):
        """The base kernel as it is: only the bias carries the control."""
        return ops.convert_to_tensor(self.base_layer.kernel)

    def get_config(self):
        return {
            **super().get_config(),
            "control_initializer": keras.initializers.serialize(self.control_initializer),
        }
