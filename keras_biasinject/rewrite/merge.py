"""`merge` and `remove`: from an injected model back to a plain KerasHub model.

- `merge(model, control)` returns a new model of the original KerasHub class whose kernels carry the
  update for one fixed control: no adapters, no extra inference cost, loadable without this package.
  The injected model is left as it was.
- `remove(model)` undoes `inject` in place: the original layers go back where they were, the class
  and the trainable flags are restored, and the model computes exactly what the base computed.
"""

import keras_hub
import numpy as np
from keras import ops

from keras_biasinject.rewrite.feedback import remove_feedback_head
from keras_biasinject.rewrite.inject import set_report, swap_layer
from keras_biasinject.rewrite.injected_model import InjectedModel


def splices_of(model, caller, name=None):
    """The `(Target, adapter)` pairs `inject` spliced into `model`, in splice order (only those of the
    adapter `name` when given); `caller` names the function in the error raised for a model `inject`
    did not return."""
    if not isinstance(model, InjectedModel):
        raise ValueError(f"{caller}: expected a model returned by `inject`; got a plain {type(model).__name__}.")
    undo = getattr(model, "_kbi_undo", None)
    if undo is None:
        raise ValueError(
            f"{caller}: this {type(model).__name__} is the backbone of an injected task; call "
            f"`{caller}` on the task that `inject` returned."
        )
    if name is None:
        return undo.splices
    return [splice for step in undo.steps if step.name == name for splice in step.splices]


def _fixed_control(model, control):
    dim = model.injection.config.control_dim
    control = model.resolve_control(control)
    if control is None:
        return np.broadcast_to(np.asarray(model.injection.config.neutral, "float32"), (dim,)).copy()
    values = np.asarray(ops.convert_to_numpy(control), "float32")
    if values.shape not in ((dim,), (1, dim)):
        raise ValueError(
            f"merge: `control` must be one vector of {dim} value(s) (control_dim={dim}): the merged model "
            f"serves that control only. Got shape {values.shape}."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"merge: `control` must be finite. Got {values.tolist()}.")
    return values.reshape(dim)


def _merged_values(adapter, control):
    """{id(base variable): merged value} for one adapter at `control` (the model's, of which the adapter
    reads its part), without changing the adapter."""
    base = adapter.base_layer
    kernel, bias, offset = adapter.merged_weights(adapter.own_control(control))
    if offset is not None and np.any(ops.convert_to_numpy(offset) != 0):
        raise ValueError(
            f"merge: layer '{base.path}' has no bias over its outputs, so the control's bias term "
            "(c - neutral) V cannot be folded into a plain model of this class. Serve the injected "
            "model (or export it with a fixed control), or merge at a control where that term is zero."
        )
    values = {id(base.kernel): ops.convert_to_numpy(kernel)}
    if bias is not None:
        values[id(base.bias)] = ops.convert_to_numpy(bias)
    return values


def _base_weights(model, splices):
    """The model's variables minus those the adapters (and a feedback head) own, in `model.weights` order."""
    owned = {id(v) for _, adapter in splices for v in adapter.own_weights}
    if getattr(model, "feedback_head", None) is not None:  # a plain KerasHub model has no head to carry it
        owned.update(id(v) for v in model.feedback_head.weights)
    return [v for v in model.weights if id(v) not in owned]


def merge(model, control=None):
    """Returns a plain model of the original KerasHub class with the update for `control` folded in.

    The result has no adapters and no `control` input: it is what the injected model computes at
    that control (within float rounding), at the base model's cost, and it saves and loads with
    keras_hub alone. At the neutral control with gate "control" it equals the base model exactly.
    The injected model is not changed. Merging needs the base in float: a quantized base raises.
    A feedback head is left out (the merged model has only the base's outputs). The merged model
    shares the injected model's preprocessor (tokenizer and vocabulary), so `generate("text")` works.

    Args:
        model: a model returned by `inject`.
        control: one control vector `[control_dim]` or a stored name; default: the neutral control.
            With several adapters: the combined control, e.g. `model.mix({"a": 0.7, "b": 0.3})`.

    Example:
    >>> positive = merge(lm, "positive")      # a plain GPT2CausalLM
    >>> positive.save("positive.keras")        # loads with keras_hub only
    """
    splices = splices_of(model, "merge")
    control = _fixed_control(model, control)
    quantized = [a.base_layer.path for _, a in splices if a.base_layer.quantization_mode is not None]
    if quantized:
        raise ValueError(
            f"merge: the base of {quantized[0]!r} (and {len(quantized) - 1} more) is quantized; a low-rank "
            "update cannot be folded into quantized weights. Merge before quantizing, or serve the "
            "injected model unmerged."
        )
    merged_adapters = [a.path for _, a in splices if a.merged]
    if merged_adapters:
        raise ValueError(f"merge: adapter {merged_adapters[0]!r} is merged by hand; call its `unmerge()` first.")
    overrides = {}
    for _, adapter in splices:  # several adapters on one layer: the first's merged value plus the others' updates
        for key, value in _merged_values(adapter, control).items():
            if key in overrides:
                original = ops.convert_to_numpy(next(v for v in adapter.base_layer.weights if id(v) == key))
                value = overrides[key] + (value - original)
            overrides[key] = value

    config = model.get_config()["base_config"]
    if getattr(model, "preprocessor", None) is not None:  # a config holds no vocabulary: share the loaded one
        config["preprocessor"] = model.preprocessor
    plain = model._base_class.from_config(config)
    source = _base_weights(model, splices)
    target = plain.weights
    if len(source) != len(target) or any(s.path != t.path or s.shape != t.shape for s, t in zip(source, target)):
        raise RuntimeError(
            "merge: the rebuilt base model's weights do not line up with the injected model's "
            f"({len(target)} against {len(source)}). Please report this with the model class."
        )
    for s, t in zip(source, target):
        t.assign(overrides.get(id(s), s.value))
    return plain


def remove(model):
    """Undoes `inject` in place and returns the base model: same layers, class, trainable flags and
    outputs as before `inject` (bit for bit). Every adapter goes (a model with several loses them all).
    Trained adapter weights (and a feedback head) are discarded: save them first with `save_adapter`
    if you want them back."""
    splices = splices_of(model, "remove")
    merged = [a.path for _, a in splices if a.merged]
    if merged:
        raise ValueError(f"remove: adapter {merged[0]!r} is merged; call its `unmerge()` first.")
    if getattr(model, "feedback_head", None) is not None:
        remove_feedback_head(model)  # discarded with the adapters
    for target, adapter in reversed(splices):
        swap_layer(target.parent, target.attr, adapter, target.layer)
    _restore_trainable(model._kbi_undo.trainable_before)
    backbone = model.backbone if isinstance(model, keras_hub.models.Task) else model
    for obj in {id(model): model, id(backbone): backbone}.values():
        obj.__class__ = obj._base_class
        for attr in ("injection", "_kbi_undo", "_kbi_control_input"):
            obj.__dict__.pop(attr, None)
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None  # compiled with the adapters: recompile on next generate
    return model


def _restore_trainable(trainable_before):
    variables, layers = trainable_before
    for layer, trainable in layers:  # layers first: setting a layer's flag resets its variables'
        layer.trainable = trainable
    for variable, trainable in variables:
        variable.trainable = trainable


def remove_last_adapter(model):
    """Undoes the last `inject` call in place (the model keeps the adapters before it; with only one,
    as `remove`) and returns the model. `load_adapter` uses it to leave a model as it was on error."""
    undo = getattr(model, "_kbi_undo", None)
    if undo is None or len(undo.steps) == 1:
        return remove(model)
    step = undo.steps.pop()
    for target, adapter in reversed(step.splices):
        swap_layer(target.parent, target.attr, adapter, target.layer)
    _restore_trainable(step.trainable_before)
    set_report(model, step.report_before)
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None
    return model
