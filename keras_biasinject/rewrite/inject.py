"""`inject`: splice control adapters into a KerasHub backbone or task."""

import contextlib
import dataclasses
import re

import keras

from keras_biasinject.layers import ADAPTER_KINDS, ControlAdapter
from keras_biasinject.layers.projection import Projection
from keras_biasinject.rewrite.config import InjectionConfig
from keras_biasinject.rewrite.frozen import count_params
from keras_biasinject.rewrite.injected_model import InjectedModel, injected_class
from keras_biasinject.rewrite.kerashub import backbone_of
from keras_biasinject.rewrite.targets import find_layers, find_targets

DEFAULT_NAME = "default"  # the name of an adapter injected without one


@dataclasses.dataclass
class InjectionReport:
    """What `inject` did: available as `model.injection`, printed by `model.summary()`."""

    config: InjectionConfig
    paths: list  # adapted layer paths
    trainable_params: int
    total_params: int
    named_controls: dict = dataclasses.field(default_factory=dict)  # {name: tuple of control_dim floats}
    name: str = DEFAULT_NAME  # the adapter's name (`inject(..., name=...)`), which a model with several tells apart

    def __str__(self):
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        named = "" if self.name == DEFAULT_NAME else f"adapter {self.name!r}: "
        lines = [
            f"Bias injection: {named}{len(self.paths)} layers adapted ({self.config.kind}, rank {self.config.rank}, "
            f"control_dim {self.config.control_dim}, gate {self.config.gate!r})",
            f"  trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)",
        ]
        lines += [f"  - {path}" for path in self.paths]
        lines += [f"  control {name!r}: {list(vector)}" for name, vector in self.named_controls.items()]
        return "\n".join(lines)


@dataclasses.dataclass
class ControlLayout:
    """The control of a model with several adapters: their controls side by side, in injection order.
    It answers `model.injection.config.control_dim` and `.neutral` as one adapter's `InjectionConfig` does."""

    control_dim: int  # the sum of the adapters' control_dim
    neutral: list  # the adapters' neutral controls, concatenated: the base model (with gate "control")
    slices: dict  # {adapter name: (start, stop)}: the part of the control each adapter reads

    def __str__(self):
        return ", ".join(f"{name!r} -> control[..., {start}:{stop}]" for name, (start, stop) in self.slices.items())


@dataclasses.dataclass
class AdapterSet:
    """`model.injection` once a model holds several adapters (`inject` or `load_adapter` with a new `name`)."""

    adapters: dict  # {name: InjectionReport}, in injection order (the order of their parts of the control)
    trainable_params: int
    total_params: int
    named_controls: dict = dataclasses.field(default_factory=dict)  # {name: tuple of the combined control's floats}

    @property
    def config(self):
        slices, neutral, start = {}, [], 0
        for name, report in self.adapters.items():
            slices[name] = (start, start + report.config.control_dim)
            neutral += neutral_vector(report.config)
            start += report.config.control_dim
        return ControlLayout(start, neutral, slices)

    @property
    def paths(self):
        return [path for report in self.adapters.values() for path in report.paths]

    def __str__(self):
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [f"Bias injection: {len(self.adapters)} adapters, one control of {self.config.control_dim} values "
                 f"({self.config})", f"  trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)"]
        lines += ["  " + line for report in self.adapters.values() for line in str(report).splitlines()]
        lines += [f"  control {name!r}: {list(vector)}" for name, vector in self.named_controls.items()]
        return "\n".join(lines)


def neutral_vector(config):
    """An `InjectionConfig`'s neutral control as a list of `control_dim` floats."""
    neutral = config.neutral
    return [float(v) for v in neutral] if isinstance(neutral, list) else [float(neutral)] * config.control_dim


@dataclasses.dataclass
class Step:
    """One `inject` call, as `remove` undoes it."""

    name: str  # the adapter's name
    splices: list  # [(Target, adapter)] in splice order; `Target.layer` is what the adapter replaced
    report_before: object  # `model.injection` before this call (None for the first)
    trainable_before: tuple  # ([(variable, flag)], [(layer, flag)]) before this call


class Undo:
    """What `remove` needs to give the base model back exactly (a plain object: Keras does not track it)."""

    def __init__(self, steps):
        self.steps = steps  # [Step], one per `inject` call, in order

    @property
    def splices(self):
        return [splice for step in self.steps for splice in step.splices]

    @property
    def trainable_before(self):
        return self.steps[0].trainable_before


def _make_adapter(target, config, **kwargs):
    path = target.parent.path.split("/") if target.parent.path else []
    scopes = [keras.name_scope(name) for name in path]
    for scope in scopes:  # weights get the target's path: ".../self_attention/query_lora_bias/lora_a"
        scope.__enter__()
    try:
        return ADAPTER_KINDS[config.kind].for_injection(target.layer, config, **kwargs)
    finally:
        for scope in reversed(scopes):
            scope.__exit__(None, None, None)


def swap_layer(parent, attr, old, new):
    """`parent.<attr> = new` in place of `old`, at old's position in `parent._layers`."""
    index = next((i for i, layer in enumerate(parent._layers) if layer is old), None)
    parent._tracker.unlock()  # built KerasHub layers lock their attributes
    try:
        setattr(parent, attr, new)
    finally:
        parent._tracker.lock()
    # In place: the tracker keeps appending to this very list. Keep the original order, so that
    # `model.weights` lists variables in the same order before and after.
    parent._layers[:] = [layer for layer in parent._layers if layer is not old and layer is not new]
    if index is not None:
        parent._layers.insert(index, new)


def _splice(target, adapter):
    swap_layer(target.parent, target.attr, target.layer, adapter)


def _freeze_base(model, extra_trainable, keep=()):
    """Only adapter weights, the layers listed in `trainable` and the variables in `keep` stay trainable."""
    keep = set(keep)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, ControlAdapter):
            keep.update(id(v) for v in layer.own_weights)
    for layer in extra_trainable:
        layer.trainable = True
        keep.update(id(v) for v in layer.weights)
    for variable in model.weights:
        if id(variable) not in keep:
            variable.trainable = False


def refuse_silent_distribution(where):
    """Raises if a `keras.distribution` is set on a backend where Keras ignores it (all but JAX)."""
    distribution = keras.distribution.distribution()
    if distribution is not None and keras.backend.backend() != "jax":
        raise ValueError(
            f"{where}: a keras.distribution ({type(distribution).__name__}) is set, but the Keras backend is "
            f"{keras.backend.backend()!r}, where keras.distribution silently does nothing (every weight stays whole on "
            "one device). Run with KERAS_BACKEND=jax to shard, or, to replicate over several devices on TensorFlow, unset "
            "the distribution (keras.distribution.set_distribution(None)) and use a tf.distribute strategy "
            "(keras_biasinject.distribute.make_strategy('mirrored' | 'multi-worker' | 'tpu'); kbi finetune --strategy)."
        )


def inject(model, config=None, name=DEFAULT_NAME, **fields):
    """Splices control adapters into a KerasHub backbone or task, in place, and returns it.

    The returned model is of the same class (`isinstance(model, GPT2Backbone)` still holds) with a
    new `control` input (`[batch, control_dim]` or `[batch, seq, control_dim]`; encoder-decoders take
    per-example controls only) in its inputs dict and in `model.inputs`; without one it behaves as at
    the neutral control. At insertion the output is unchanged bit for
    bit; base weights are frozen. Every check runs before anything changes: on error the model is
    exactly as it was.

    Injecting a model that is already injected adds another adapter under a new `name`: the model's
    control becomes the adapters' controls side by side, in injection order (`model.control_layout`
    says which slice is which; `model.mix` and `model.control_for` build one). Each adapter reads only
    its own slice; on a layer that two adapters target, the second adds its terms to the first's
    output. With gate "control", an adapter whose slice is neutral adds exactly nothing.

    Args:
        model: a `keras_hub.models.Backbone` or `Task` (CausalLM, TextClassifier, ...), plain or injected.
        config: an `InjectionConfig`; or give its fields as keyword arguments.
        name: the adapter's name (letters, digits, `_`), unique in the model; default "default".

    Example:
    >>> lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> lm = inject(lm, targets="attention", rank=8, gate="control")
    >>> lm.summary()                      # matched layers, trainable parameters
    >>> lm({"token_ids": t, "padding_mask": m, "control": c})
    >>> inject(lm, name="style", targets="mlp", kind="bias")   # a second adapter: control [c, c_style]
    """
    if config is None:
        config = InjectionConfig(**fields)
    elif fields:
        config = InjectionConfig(**{**config.to_dict(), **fields})
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"inject: `name` must be a non-empty name of letters, digits and '_' (it becomes part of the "
                         f"adapter layers' names). Got name={name!r}.")
    if isinstance(model, InjectedModel):
        return _inject_another(model, config, name)
    refuse_silent_distribution("inject")
    backbone = backbone_of(model)
    if isinstance(backbone, InjectedModel):
        raise ValueError("inject: this task's backbone is already injected; inject either the backbone or the task, once.")
    targets = find_targets(backbone, config)
    extra = find_layers(model, config.trainable) if config.trainable else []
    for target in targets:  # the adapters' own checks, before any adapter freezes its base
        Projection(target.layer, f"inject: targets={config.targets!r}: layer '{target.path}'")
    trainable_before = _trainable_flags(model)  # what `remove` restores; adapters freeze their base layers when made
    adapters = [_make_adapter(target, config) for target in targets]

    for target, adapter in zip(targets, adapters):
        _splice(target, adapter)
    for obj in {id(backbone): backbone, id(model): model}.values():
        obj.__class__ = injected_class(type(obj))
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None  # compiled before the splice: recompile on next generate
    _freeze_base(model, extra)
    report = InjectionReport(config, [t.path for t in targets], count_params(model.trainable_weights),
                             count_params(model.weights), name=name)
    backbone.injection = report
    model.injection = report
    model._kbi_undo = Undo([Step(name, list(zip(targets, adapters)), None, trainable_before)])
    return model


def _trainable_flags(model):
    return (
        [(v, v.trainable) for v in model.weights],
        [(layer, layer.trainable) for layer in model._flatten_layers(include_self=True, recursive=True)],
    )


@contextlib.contextmanager
def adapters_lifted(undo):
    """The model's original layers back in place of its adapters inside the block, so that patterns
    match on the base's layer tree; the adapters always go back in place after it."""
    splices = undo.splices
    for target, adapter in reversed(splices):
        swap_layer(target.parent, target.attr, adapter, target.layer)
    try:
        yield
    finally:
        for target, adapter in splices:
            swap_layer(target.parent, target.attr, target.layer, adapter)


def _inject_another(model, config, name):
    """`inject` on an injected model: one more adapter, named `name`, with its own slice of the control."""
    undo = getattr(model, "_kbi_undo", None)
    if undo is None:
        raise ValueError(f"inject: this {type(model).__name__} is the backbone of an injected task; add the adapter "
                         "to the task that `inject` returned.")
    names = list(model.adapters)
    if name in names:
        raise ValueError(
            f"inject: this {type(model).__name__} is already injected, with an adapter named {name!r} (its adapters: "
            f"{names}); two adapters cannot share a name. To add another adapter, pass a new `name`: "
            f"inject(model, name='{name}_2', ...)."
        )
    merged = [a.path for _, a in undo.splices if a.merged]
    if merged:
        raise ValueError(f"inject: adapter {merged[0]!r} is merged; call its `unmerge()` before adding an adapter.")
    refuse_silent_distribution("inject")
    backbone = backbone_of(model)
    with adapters_lifted(undo):  # the same layers match as on the base model
        targets = find_targets(backbone, config)
        extra = find_layers(model, config.trainable) if config.trainable else []
    for target in targets:
        Projection(target.layer, f"inject: targets={config.targets!r}: layer '{target.path}'")
    trainable_before, keep = _trainable_flags(model), [id(v) for v in model.trainable_weights]
    holders = [getattr(t.parent, t.attr) for t in targets]  # the layer itself, or the adapter around it
    adapters = []
    for target, holder in zip(targets, holders):
        cls = ADAPTER_KINDS[config.kind]
        adapter = _make_adapter(target, config, name=f"{target.layer.name}_{name}{cls.name_suffix}")
        if holder is not target.layer:
            adapter.stack_on(holder)
        adapters.append(adapter)
    splices = [(dataclasses.replace(t, layer=holder), a) for t, holder, a in zip(targets, holders, adapters)]
    for target, adapter in splices:
        _splice(target, adapter)
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None
    _freeze_base(model, extra, keep)
    own = [v for a in adapters for v in a.own_weights] + [v for layer in extra for v in layer.weights]
    report = InjectionReport(config, [t.path for t in targets], count_params(own), count_params(model.weights), name=name)
    before = model.injection
    added = neutral_vector(config)
    combined = AdapterSet(
        {**model.adapters, name: report}, count_params(model.trainable_weights), count_params(model.weights),
        {key: tuple(vector) + tuple(added) for key, vector in before.named_controls.items()},  # the new adapter off
    )
    undo.steps.append(Step(name, splices, before, trainable_before))
    set_report(model, combined)
    return model


def set_report(model, report):
    """Makes `report` the injection of `model` (and of its backbone) and points every adapter at its slice
    of the control (the whole control when there is one adapter)."""
    backbone = backbone_of(model)
    for obj in {id(backbone): backbone, id(model): model}.values():
        obj.injection = report
        obj.__dict__.pop("_kbi_control_input", None)  # its width is the control's
    undo = model._kbi_undo
    slices = report.config.slices if isinstance(report, AdapterSet) else None
    for step in undo.steps:
        for _, adapter in step.splices:
            adapter.control_start = None if slices is None else slices[step.name][0]
