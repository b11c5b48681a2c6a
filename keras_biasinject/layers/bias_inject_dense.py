import keras
from keras import ops

from keras_biasinject.layers import control as control_lib
from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.layers.projection import Projection, layer_path


@keras.saving.register_keras_serializable(package="keras_biasinject")
class BiasInjectDense(keras.layers.Layer):
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
        projection = Projection(base_layer, name)
        kwargs.setdefault("dtype", projection.dtype_policy)
        super().__init__(**kwargs)
        self.control_dim = check_positive_int(control_dim, "control_dim", name)
        self.neutral = control_lib.check_neutral(neutral, self.control_dim, name)
        self.control_initializer = keras.initializers.get(control_initializer)
        self.base_layer = base_layer
        self.projection = projection
        self.activation = keras.activations.linear if self.projection.linear else base_layer.activation
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
        kwargs.setdefault("name", f"{layer.name}_bias_inject")
        wrapped = cls(control_dim=control_dim, neutral=neutral, base_layer=layer, **kwargs)
        layer.trainable = False  # only after every check passed
        return wrapped

    def build(self, input_shape=None):
        if not self.base_layer.built:
            self.base_layer.build(input_shape)
        self.control_kernel = self.add_weight(
            name="control_kernel",
            shape=(self.control_dim,) + self.projection.feature_shape,
            initializer=self.control_initializer,
        )

    @property
    def kernel(self):
        return self.base_layer.kernel

    @property
    def bias(self):
        return self.base_layer.bias

    def call(self, inputs, control=None):
        y = self.projection.pre_activation(inputs)  # (B, ..., *features)
        control = control_lib.current_control() if control is None else control
        if control is not None:
            lead = len(y.shape) - len(self.projection.feature_shape)
            d = control_lib.centred_control(
                control, self.neutral, self.control_dim, lead, self.compute_dtype, self.path
            )
            y = ops.add(y, control_lib.control_term(d, self.control_kernel, len(y.shape)))
        if self.projection.linear:
            return y
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "control_dim": self.control_dim,
            "neutral": self.neutral,
            "control_initializer": keras.initializers.serialize(self.control_initializer),
            "base_layer": keras.saving.serialize_keras_object(self.base_layer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(config["base_layer"])
        return cls(**config)
