"""`ControlAdapter`: the interface every adapter kind shares, so that `merge`, adapter files and
sharding loop over it instead of listing kinds.
"""

import keras
from keras import ops

from keras_biasinject.layers import control as control_lib
from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.layers.projection import Projection, layer_path


class ControlAdapter(keras.layers.Layer):
    """A control adapter around a Dense or EinsumDense: `y = activation(adapted(x, c))`.

    Every kind has a control kernel `V` (`[control_dim, *features]`) whose term `(c - neutral) V`
    is a bias. A kind (a subclass) sets `kind` (its `InjectionConfig.kind`), `name_suffix` (its
    weights live at `<parent>/<base name><name_suffix>/<weight>`) and `weight_names`, and implements
    `adapted`, `merged_kernel` and `for_injection` (and `weight_layout` for weights other than `V`).
    This class gives the rest: the merged call, `merge`/`unmerge`, `merged_weights`, `own_weights`,
    the refusal to save while merged, and the config round trip.

    Several adapters on one layer (a model with several, see `inject`): the outer adapter is
    `stack_on` the inner one and adds its terms to the inner's output; each reads its own slice of the
    model's combined control (`control_start`). Both are set by `inject`, not saved in the config.

    Args:
        base_layer: the `Dense` or `EinsumDense` it wraps.
        control_dim: number of control inputs `k`.
        neutral: the neutral control: a float or `k` floats.

    Call arguments:
        inputs: the base layer's input.
        control: `[control_dim]`, `[batch, control_dim]` or `[batch, seq, control_dim]`; when
            omitted, the enclosing `control_scope`'s control, else the neutral control.

    Output shape: the base layer's.

    Example (`adapter` of any kind, e.g. `LoRABiasAdapter(query, rank=4, control_dim=1)`):
    >>> kernel, bias, offset = adapter.merged_weights([1.0])   # values only: nothing changes
    >>> adapter.merge([1.0]); y1 = adapter(x)                   # the update for c = 1, folded in
    >>> adapter.unmerge()                                       # the original weights, bit for bit
    >>> [w.name for w in adapter.own_weights]                   # what the adapter added
    """

    kind = None  # its name in `InjectionConfig.kind`
    name_suffix = None  # default name: the base layer's name + this
    weight_names = ()  # the weights it adds, in creation order

    def __init__(self, base_layer, control_dim, neutral, **kwargs):
        owner = type(self).__name__
        projection = Projection(base_layer, owner)
        control_dim = check_positive_int(control_dim, "control_dim", owner)
        neutral = control_lib.check_neutral(neutral, control_dim, owner)
        kwargs.setdefault("dtype", projection.dtype_policy)
        super().__init__(**kwargs)
        self.base_layer = base_layer
        self.projection = projection
        self.control_dim = control_dim
        self.neutral = neutral
        self._merged = None  # (kernel, bias, offset) saved by merge(), or None
        # Several adapters in one model (set by `inject`, not part of the config): where this adapter's part
        # starts in the model's combined control (None: the control is this adapter's alone), and the
        # adapter on the same base layer whose output this one adds to (None: the base layer itself).
        self.control_start = None
        self.inner = None

    @classmethod
    def default_name(cls, base_layer):
        """`query` -> `query_lora_bias`: the adapter's name, which its weights' paths carry."""
        return f"{base_layer.name}{cls.name_suffix}"

    @classmethod
    def for_injection(cls, layer, config, **kwargs):
        """The adapter `inject` splices around `layer` for `config` (an `InjectionConfig`); `kwargs`
        reach the layer (`name`)."""
        raise NotImplementedError(f"{cls.__name__} does not say how `inject` makes it.")

    def freeze_base(self):
        """Freezes the base layer, so that only the adapter's own weights train."""
        self.base_layer.trainable = False

    def add_control_kernel(self, initializer):
        """Creates `V`, `[control_dim, *features]`, of the control's bias term `(c - neutral) V`."""
        self.control_kernel = self.add_weight(
            name="control_kernel", shape=(self.control_dim,) + self.projection.feature_shape, initializer=initializer
        )

    def stack_on(self, inner):
        """Makes this adapter add its terms to `inner`'s output (an adapter around the same base layer)
        instead of the base layer's: several adapters on one layer, each reading its own part of the
        control. `inject` calls it when a model gets a second adapter on a layer."""
        if inner.base_layer is not self.base_layer:
            raise ValueError(f"Layer '{self.path}': can stack only on an adapter of the same base layer "
                             f"'{layer_path(self.base_layer)}'; '{inner.path}' wraps '{layer_path(inner.base_layer)}'.")
        self._tracker.unlock()  # built layers lock their attributes
        try:
            self.inner = inner
        finally:
            self._tracker.lock()

    @property
    def own_weights(self):
        """The variables this adapter adds (not its base layer's, nor those of an adapter under it), in creation order."""
        other = {id(v) for v in self.base_layer.weights}
        if self.inner is not None:
            other.update(id(v) for v in self.inner.weights)
        return [v for v in self.weights if id(v) not in other]

    @property
    def merged(self):
        return self._merged is not None

    def call(self, inputs, control=None):
        if self._merged is not None and control is not None:
            raise ValueError(
                f"Layer '{self.path}' is merged for one fixed control and ignores `control`. "
                "Call `unmerge()` to use per-request controls again."
            )
        control = control_lib.current_control() if control is None else control
        return self.activate(self.stacked(inputs, control))

    def stacked(self, inputs, control):
        """The output before the base's activation, with the terms of the adapters under this one;
        `control` is the model's (the combined control when `control_start` is set)."""
        if self._merged is not None:
            y = self.projection.pre_activation(inputs)
            offset = self._merged[2]
            return y if offset is None else ops.add(y, ops.cast(offset, y.dtype))
        under = None if self.inner is None else self.inner.stacked(inputs, control)
        hoisted = control_lib.hoisted_terms(self, control)
        if hoisted is not None:
            return self.adapted_hoisted(inputs, control, hoisted, under)
        return self.adapted(inputs, self.own_control(control), under)

    def hoist(self, control):
        """The terms of this adapter that depend only on the model's `control` (`[batch, control_dim]`),
        computed once before a loop that calls the adapter many times with it (`generate`), or None when
        the kind has none to hoist. `adapted_hoisted` uses them; the result is the same, bit for bit."""
        return None

    def adapted_hoisted(self, inputs, control, hoisted, under=None):
        raise NotImplementedError(f"{type(self).__name__}: a kind whose `hoist` returns terms implements `adapted_hoisted`.")

    def own_control(self, control):
        """This adapter's part of `control`: all of it, or with several adapters in the model its slice."""
        if control is None or self.control_start is None:
            return control
        return control_lib.control_part(control, self.control_start, self.control_dim)

    def base_output(self, inputs, under):
        """What the adapter's terms add to: `under` (the output of the adapters under it), else the base's
        pre-activation output."""
        return self.projection.pre_activation(inputs) if under is None else under

    def adapted(self, inputs, control, under=None):
        """The output before the base's activation; `control` None means the neutral control; `under`:
        see `base_output`."""
        raise NotImplementedError(f"{type(self).__name__}: every adapter kind implements `adapted` (see LoRABiasAdapter).")

    def activate(self, y):
        """The base layer's activation, applied after the adapter's terms (none for a linear base)."""
        return y if self.projection.linear else self.base_layer.activation(y)

    def centred(self, control, y):
        """`c - neutral` for a call whose pre-activation output is `y` (checked against its axes)."""
        lead = len(y.shape) - len(self.projection.feature_shape)
        centred = control_lib.centred_control(control, self.neutral, self.control_dim, max(lead, 2), self.compute_dtype, self.path)
        if lead >= 2 and len(centred.shape) == 3 and None not in (y.shape[1], centred.shape[1]) and y.shape[1] != centred.shape[1]:
            raise ValueError(  # DeBERTa runs its query/key projections on relative-position buckets too
                f"{self.path}: control has shape {tuple(centred.shape)} (per token), but this layer is called on "
                f"{y.shape[1]} positions, not the control's {centred.shape[1]}. Pass one control per example, "
                f"[batch, {self.control_dim}]."
            )
        if lead != 1 or len(centred.shape) == 1:
            return centred
        # One leading axis: examples (a head over pooled outputs), or tokens flattened batch-major to
        # [batch * seq, features] (MoE routers and shared experts): per-example controls repeat over each
        # example's tokens, per-token controls flatten alike.
        if len(centred.shape) == 3:
            rows, known = y.shape[0], None not in centred.shape[:2]
            if rows is not None and known and rows != centred.shape[0] * centred.shape[1]:
                raise ValueError(
                    f"{self.path}: control has shape {tuple(centred.shape)} (per token), but this layer sees {rows} rows, "
                    f"not batch x seq = {centred.shape[0] * centred.shape[1]}. Pass one control per example, [batch, {self.control_dim}]."
                )
            return ops.reshape(centred, (-1, self.control_dim))
        rows, batch = y.shape[0], centred.shape[0]
        if None not in (rows, batch) and rows % batch:
            raise ValueError(
                f"{self.path}: control has shape {tuple(centred.shape)} (per example), but this layer sees {rows} rows, "
                f"which is not a whole number of tokens per example. Pass a control with one row per example of the input."
            )
        return ops.repeat(centred, ops.shape(y)[0] // ops.shape(centred)[0], axis=0)

    def control_bias(self, centred, y):
        """`(c - neutral) V`, aligned to add to `y`."""
        return control_lib.control_term(centred, self.control_kernel, len(y.shape))

    def merged_kernel(self, centred):
        """The base kernel with the update for one centred control (`[control_dim]`) folded in."""
        raise NotImplementedError(f"{type(self).__name__}: every adapter kind implements `merged_kernel` (see LoRABiasAdapter).")

    def merged_weights(self, control=None):
        """The base's weights with the adapter folded in for one fixed control; changes nothing.

        `control`: `[control_dim]`, default the neutral control. Returns `(kernel, bias, offset)`:
        the base's kernel and bias values (`bias` None when the base has none), and the offset
        `(c - neutral) V` (`[*features]`) when it cannot be folded into the bias because the base has
        no bias over all its output features, else None.
        """
        base = self.base_layer
        if base.quantization_mode is not None:
            raise ValueError(
                f"Layer '{self.path}': the base is quantized ({base.quantization_mode}); the adapter's "
                "update cannot be folded into quantized weights. Use the adapter unmerged."
            )
        if control is None:
            control = ops.zeros((self.control_dim,)) + ops.convert_to_tensor(self.neutral, "float32")
        d = control_lib.centred_control(control, self.neutral, self.control_dim, 0, "float32", self.path)  # (k,)
        kernel = ops.cast(self.merged_kernel(d), base.kernel.dtype)
        offset = control_lib.control_term(d, self.control_kernel, len(self.projection.feature_shape))  # (*features)
        if base.bias is None:
            return kernel, None, offset
        if tuple(base.bias.shape) != tuple(offset.shape):
            return kernel, ops.convert_to_tensor(base.bias), offset
        return kernel, ops.cast(ops.add(base.bias, offset), base.bias.dtype), None

    def merge(self, control=None):
        """Folds the update for one fixed control (`[control_dim]`, default neutral) into the base.

        The kernel and bias become `merged_weights(control)`; an offset that no bias can hold is
        added on each call. Call `unmerge()` to restore the original weights exactly.
        """
        if self._merged is not None:
            raise ValueError(f"Layer '{self.path}' is already merged. Call `unmerge()` first.")
        if self.inner is not None:
            raise ValueError(
                f"Layer '{self.path}' is stacked on adapter '{self.inner.path}' (several adapters on one layer), so "
                "merging one of them alone would fold the wrong update. Merge the whole model at one control with "
                "`keras_biasinject.merge(model, control)`."
            )
        kernel, bias, offset = self.merged_weights(control)
        base = self.base_layer
        saved_kernel = ops.copy(base.kernel.value)
        saved_bias = None if base.bias is None else ops.copy(base.bias.value)
        base.kernel.assign(kernel)
        if bias is not None:
            base.bias.assign(bias)
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

    @classmethod
    def weight_layout(cls, weight, kernel_axes, rank):
        """The sharding axes of the own weight `weight` (with `rank` axes), given those of the kernel
        it adapts (e.g. `["model", "batch", None]`): `V` like the kernel's trailing (feature) axes,
        its control axis whole; weights a kind does not place are whole."""
        if weight == "control_kernel":  # [control_dim, *feature axes]
            return [None] + list(kernel_axes[len(kernel_axes) - (rank - 1):])
        return [None] * rank

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "base_layer": keras.saving.serialize_keras_object(self.base_layer),
            "control_dim": self.control_dim,
            "neutral": self.neutral,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(config["base_layer"])
        return cls(**config)
