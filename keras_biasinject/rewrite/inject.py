"""`inject`: splice control adapters into a KerasHub backbone or task."""

import dataclasses

import keras

from keras_biasinject.layers import ADAPTER_KINDS, ControlAdapter
from keras_biasinject.layers.projection import Projection
from keras_biasinject.rewrite.config import InjectionConfig
from keras_biasinject.rewrite.frozen import count_params
from keras_biasinject.rewrite.injected_model import InjectedModel, injected_class
from keras_biasinject.rewrite.kerashub import backbone_of
from keras_biasinject.rewrite.targets import find_layers, find_targets


@dataclasses.dataclass
class InjectionReport:
    """What `inject` did: available as `model.injection`, printed by `model.summary()`."""

    config: InjectionConfig
    paths: list  # adapted layer paths
    trainable_params: int
    total_params: int
    named_controls: dict = dataclasses.field(default_factory=dict)  # {name: tuple of control_dim floats}

    def __str__(self):
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [
            f"Bias injection: {len(self.paths)} layers adapted ({self.config.kind}, rank {self.config.rank}, "
            f"control_dim {self.config.control_dim}, gate {self.config.gate!r})",
            f"  trainable params: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)",
        ]
        lines += [f"  - {path}" for path in self.paths]
        lines += [f"  control {name!r}: {list(vector)}" for name, vector in self.named_controls.items()]
        return "\n".join(lines)


class Undo:
    """What `remove` needs to give the base model back exactly (a plain object: Keras does not track it)."""

    def __init__(self, splices, trainable_before):
        self.splices = splices  # [(Target, adapter)] in splice order
        self.trainable_before = trainable_before  # ([(variable, flag)], [(layer, flag)])


def _make_adapter(target, config):
    path = target.parent.path.split("/") if target.parent.path else []
    scopes = [keras.name_scope(name) for name in path]
    for scope in scopes:  # weights get the target's path: ".../self_attention/query_lora_bias/lora_a"
        scope.__enter__()
    try:
        return ADAPTER_KINDS[config.kind].for_injection(target.layer, config)
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


def _freeze_base(model, extra_trainable):
    """Only adapter weights and the layers listed in `trainable` stay trainable."""
    keep = set()
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


def inject(model, config=None, **fields):
    """Splices control adapters into a KerasHub backbone or task, in place, and returns it.

    The returned model is of the same class (`isinstance(model, GPT2Backbone)` still holds) with a
    new `control` input (`[batch, control_dim]` or `[batch, seq, control_dim]`; encoder-decoders take
    per-example controls only) in its inputs dict and in `model.inputs`; without one it behaves as at
    the neutral control. At insertion the output is unchanged bit for
    bit; base weights are frozen. Every check runs before anything changes: on error the model is
    exactly as it was.

    Args:
        model: a `keras_hub.models.Backbone` or `Task` (CausalLM, TextClassifier, ...).
        config: an `InjectionConfig`; or give its fields as keyword arguments.

    Example:
    >>> lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> lm = inject(lm, targets="attention", rank=8, gate="control")
    >>> lm.summary()                      # matched layers, trainable parameters
    >>> lm({"token_ids": t, "padding_mask": m, "control": c})
    """
    if config is None:
        config = InjectionConfig(**fields)
    elif fields:
        config = InjectionConfig(**{**config.to_dict(), **fields})
    if isinstance(model, InjectedModel):
        raise ValueError(f"inject: this {type(model).__name__} is already injected; inject the base model once.")
    refuse_silent_distribution("inject")
    backbone = backbone_of(model)
    if isinstance(backbone, InjectedModel):
        raise ValueError("inject: this task's backbone is already injected; inject either the backbone or the task, once.")
    targets = find_targets(backbone, config)
    extra = find_layers(model, config.trainable) if config.trainable else []
    for target in targets:  # the adapters' own checks, before any adapter freezes its base
        Projection(target.layer, f"inject: targets={config.targets!r}: layer '{target.path}'")
    trainable_before = (  # what `remove` restores; adapters freeze their base layers when made
        [(v, v.trainable) for v in model.weights],
        [(layer, layer.trainable) for layer in model._flatten_layers(include_self=True, recursive=True)],
    )
    adapters = [_make_adapter(target, config) for target in targets]

    for target, adapter in zip(targets, adapters):
        _splice(target, adapter)
    for obj in {id(backbone): backbone, id(model): model}.values():
        obj.__class__ = injected_class(type(obj))
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None  # compiled before the splice: recompile on next generate
    _freeze_base(model, extra)
    report = InjectionReport(config, [t.path for t in targets], count_params(model.trainable_weights), count_params(model.weights))
    backbone.injection = report
    model.injection = report
    model._kbi_undo = Undo(list(zip(targets, adapters)), trainable_before)
    return model
