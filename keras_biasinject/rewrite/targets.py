"""Finding the layers to adapt: every check here runs before the model is touched.

The presets are read from the model, not from a list of names, so each means the same on every family:
- "query_value": the layers KerasHub's own `enable_lora` picks (`backbone.get_lora_target_names()`, or
  `default_lora_layer_names()` in KerasHub 0.32), matched by `layer.name` as it does, in the blocks.
- "attention": every projection inside an attention sublayer of a block (self- and cross-attention;
  linear attention and RWKV time-mix count as attention). A fused q/k/v projection is one projection.
- "mlp": the feed-forward projections: those inside MLP sublayers (T5Gemma, Gemma3n, MoE shared experts), or,
  in a block without one (GPT-2, Llama, ...), every projection outside attention. Never MoE routers: a router
  picks experts, it is not a feed-forward projection (Mixtral, whose experts are raw weights, has no "mlp").
- "all-linear": every projection in the blocks (routers and Gemma3n's AltUp/LAuReL included).
A projection is a Dense or EinsumDense layer; the blocks are the backbone's transformer blocks, and for
an encoder-decoder the encoder's blocks then the decoder's (`blocks=[i]` and `Target.block` index that list).
"""

import dataclasses
import difflib
import functools
import inspect
import re
import warnings

import keras

from keras_biasinject.rewrite.config import PRESETS
from keras_biasinject.rewrite.kerashub import backbone_of

# Where KerasHub backbones keep their blocks; for an encoder-decoder, encoder first.
BLOCK_LISTS = (
    ("transformer_layers",),  # decoder-only and encoder-only families (ALBERT: a list of groups)
    ("encoder_transformer_layers", "decoder_transformer_layers"),  # BART, T5, Whisper
    ("encoder_layers", "decoder_layers"),  # T5Gemma, T5Gemma2, EdRec
    ("encoder_blocks", "decoder_blocks"),  # Moonshine
    ("rwkv_layers",),  # RWKV-7
)
# A sublayer is attention when it subclasses keras' MultiHeadAttention or its class name says so.
ATTENTION_CLASS = re.compile(r"Attention|DeltaNet|TimeMix")  # DeltaNet: Qwen3.5 linear attention; TimeMix: RWKV
FEEDFORWARD_CLASS = re.compile(r"(?i)mlp|expert|feed_?forward")  # an MLP sublayer (Gemma3n, T5Gemma, a shared expert)
ROUTER_CLASS = re.compile(r"(?i)router|moe")  # a projection held directly by one of these routes tokens to experts
PROJECTION = (keras.layers.Dense, keras.layers.EinsumDense)


@dataclasses.dataclass(frozen=True)
class Target:
    """A projection to adapt and where it hangs: `getattr(parent, attr) is layer`."""

    path: str  # layer.path, e.g. "transformer_layer_0/self_attention/query"
    layer: keras.layers.Layer
    parent: keras.layers.Layer
    attr: str  # attribute of `parent` holding the layer, e.g. "_query_dense"
    block: int  # index in `blocks_of(backbone)` (encoder-decoder: encoder blocks, then decoder blocks)


def _matches(path, pattern):
    """A list matches path suffixes; a string is a regex fullmatch (presets are resolved by `_preset_ids`)."""
    if not path:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == suffix or path.endswith("/" + suffix) for suffix in pattern)


def _flat(layers):
    for item in layers:
        if isinstance(item, (list, tuple)):
            yield from _flat(item)
        else:
            yield item


def blocks_of(backbone):
    """The backbone's transformer blocks, in order; for an encoder-decoder, the encoder's then the decoder's."""
    for owner in (backbone, getattr(backbone, "language_model", None)):  # Gemma3n keeps them in its language model
        for names in BLOCK_LISTS:
            lists = [getattr(owner, name, None) for name in names]
            if owner is not None and all(isinstance(blocks, (list, tuple)) and blocks for blocks in lists):
                return [block for blocks in lists for block in _flat(blocks)]
    raise ValueError(
        f"inject: {type(backbone).__name__} has no `transformer_layers` (nor encoder and decoder block lists: "
        f"{', '.join(' + '.join(names) for names in BLOCK_LISTS[1:])}); inject supports KerasHub text backbones "
        "built from transformer blocks (GPT2, BERT, Llama, Gemma, Qwen, Mistral, Phi3, OPT, ...) and encoder-decoders "
        "(BART, T5, ...)."
    )


def _kinds(block):
    """Maps id(projection) -> "attention", "mlp", "router" or "other" for every Dense/EinsumDense in `block`.

    Attention: inside an attention sublayer. Router: held by a MoE block or a router (not by an MLP in it).
    MLP: inside an MLP/feed-forward sublayer; a block without one (GPT-2, Llama, ...) holds its feed-forward
    projections directly, so there every other projection is "mlp"; with one (Gemma3n's AltUp and LAuReL
    beside its MLP) they are "other"."""
    kinds, loose = {}, []

    def walk(layer, context):
        for sub in getattr(layer, "_layers", []):
            name = type(sub).__name__
            if isinstance(sub, PROJECTION):
                routes = context is None and layer is not block and ROUTER_CLASS.search(type(layer).__name__)
                kind = "router" if routes else context
                if kind is None:
                    loose.append(sub)
                else:
                    kinds.setdefault(id(sub), kind)
            elif isinstance(sub, keras.layers.MultiHeadAttention) or ATTENTION_CLASS.search(name):
                walk(sub, context or "attention")
            elif FEEDFORWARD_CLASS.search(name):
                walk(sub, context or "mlp")
            else:
                walk(sub, context)

    walk(block, None)
    rest = "other" if "mlp" in kinds.values() else "mlp"
    for layer in loose:
        kinds.setdefault(id(layer), rest)
    return kinds


def _projections(block):
    """The Dense/EinsumDense layers of `block`, in `_flatten_layers` order."""
    return [layer for layer in block._flatten_layers(include_self=False, recursive=True) if isinstance(layer, PROJECTION)]


def _lora_names(backbone):
    """KerasHub's own LoRA target names (`get_lora_target_names` in newer KerasHub, `default_lora_layer_names` in 0.32)."""
    for method in ("get_lora_target_names", "default_lora_layer_names"):
        if callable(getattr(backbone, method, None)):
            return list(getattr(backbone, method)())
    return ["query_dense", "value_dense", "query", "value"]  # KerasHub 0.32's Backbone default


def _held(blocks):
    """What the blocks hold, for error messages: "attention [...]; feed-forward [...]; ..."."""
    seen = {"attention": [], "mlp": [], "router": [], "other": []}
    for block in blocks:
        kinds = _kinds(block)
        for layer in _projections(block):
            local = layer.path[len(block.path) + 1 :] if layer.path.startswith(block.path + "/") else layer.path
            if local not in seen[kinds[id(layer)]]:
                seen[kinds[id(layer)]].append(local)
    labels = {"attention": "attention", "mlp": "feed-forward", "router": "MoE routers", "other": "other"}
    parts = [f"{labels[kind]} {paths[:8]}" + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
             for kind, paths in seen.items() if paths]
    return "; ".join(parts) if parts else "no Dense/EinsumDense layer"


def _preset_ids(backbone, blocks, preset, required=True, argument="targets"):
    """ids of the projections `preset` means in `blocks`; raises (naming `argument`) if the family cannot express it."""
    if preset == "query_value":
        names = _lora_names(backbone)
        ids = {id(layer) for block in blocks for layer in _projections(block) if layer.name in names}
    else:
        wanted = {"attention": {"attention"}, "mlp": {"mlp"}, "all-linear": {"attention", "mlp", "router", "other"}}[preset]
        ids = {key for block in blocks for key, kind in _kinds(block).items() if kind in wanted}
    if required and not ids:
        name = type(backbone).__name__
        what = {
            "query_value": f"means KerasHub's LoRA layers of {name}, by name {_lora_names(backbone)}; none is in its blocks",
            "attention": f"found no attention sublayer in the blocks of {name}",
            "mlp": f"found no feed-forward projection in the blocks of {name} (outside attention; MoE routers don't count)",
            "all-linear": f"found no Dense/EinsumDense layer in the blocks of {name}",
        }[preset]
        others = [p for p in ("attention", "mlp", "all-linear") if p != preset and _preset_ids(backbone, blocks, p, required=False)]
        raise ValueError(
            f"inject: {argument}={preset!r} {what}. They hold {_held(blocks)}. "
            f"Use {' or '.join(repr(p) for p in others) + ', or ' if others else ''}a list of path suffixes or a regex."
        )
    return ids


def _selector(backbone, blocks, pattern, required=True):
    """A predicate on layers for a preset name, a regex or a list of path suffixes."""
    if isinstance(pattern, str) and pattern in PRESETS:
        ids = _preset_ids(backbone, blocks, pattern, required)
        return lambda layer: id(layer) in ids
    return lambda layer: _matches(layer.path, pattern)


def _holders(block):
    """Maps id(layer) -> (parent, attribute) for every sublayer held directly as an attribute."""
    holders = {}
    for parent in block._flatten_layers(include_self=True, recursive=True):
        for attr, value in {**getattr(parent, "_modules", {}), **vars(parent)}.items():  # torch: sublayers in _modules
            if isinstance(value, keras.layers.Layer) and value is not parent:
                holders.setdefault(id(value), (parent, attr))
    return holders


@functools.lru_cache(maxsize=None)
def _reads_weights_directly(parent_class, attr):
    """Whether `parent_class`'s source multiplies by `self.<attr>.kernel` (Gemma4's blocks do, in some
    branches), which an adapter spliced in place of that layer would never see."""
    try:
        source = inspect.getsource(parent_class)
    except (OSError, TypeError):  # no source (a class built at run time): nothing to read
        return False
    return re.search(rf"self\.{re.escape(attr)}\.kernel\b", source) is not None


def find_targets(backbone, config):
    """Returns the `Target`s of `config` in `backbone`, or raises ValueError listing close candidates."""
    blocks = blocks_of(backbone)
    if config.blocks is None:
        chosen = set(range(len(blocks)))
    else:
        bad = [b for b in config.blocks if not -len(blocks) <= b < len(blocks)]
        if bad:
            raise ValueError(
                f"inject: blocks={config.blocks} names blocks {bad} but the model has {len(blocks)} "
                f"(indices 0..{len(blocks) - 1}, or negative from the end)."
            )
        chosen = {b % len(blocks) for b in config.blocks}
    wanted = _selector(backbone, blocks, config.targets)
    unwanted = _selector(backbone, blocks, config.exclude, required=False) if config.exclude is not None else None

    candidates, targets, excluded = [], [], []
    for index, block in enumerate(blocks):
        holders = _holders(block)
        for layer in _projections(block):
            candidates.append(layer.path)
            if index not in chosen or not wanted(layer):
                continue
            if unwanted is not None and unwanted(layer):
                excluded.append(layer.path)
                continue
            if id(layer) not in holders:
                raise ValueError(f"inject: layer '{layer.path}' is not held by an attribute of its parent; it cannot be spliced.")
            parent, attr = holders[id(layer)]
            if _reads_weights_directly(type(parent), attr):
                raise ValueError(
                    f"inject: targets={config.targets!r}: layer '{layer.path}' cannot be adapted: its parent "
                    f"{type(parent).__name__} reads `self.{attr}.kernel` directly instead of calling the layer, so an "
                    f"adapter there would be bypassed. Leave it out (exclude=['{layer.path}']) or choose another preset."
                )
            targets.append(Target(layer.path, layer, parent, attr, index))

    if not targets:
        names = sorted({path.rsplit("/", 1)[-1] for path in candidates})
        wanted_text = config.targets if isinstance(config.targets, str) else " ".join(config.targets)
        close = difflib.get_close_matches(str(wanted_text), names + candidates, n=6, cutoff=0.3)
        raise ValueError(
            f"inject: targets={config.targets!r} matched no Dense/EinsumDense layer"
            + (f" in blocks {sorted(chosen)}" if config.blocks is not None else "")
            + (f" (after exclude={config.exclude!r})" if excluded else "")
            + f". Close candidates: {close or names[:8]}. Projection names in this model: {names}. "
            f"Presets: {sorted(PRESETS)}; a list matches path suffixes, a string is a regex on layer.path."
        )
    if config.exclude is not None and not excluded:
        warnings.warn(f"inject: exclude={config.exclude!r} matched none of the targeted layers.", stacklevel=3)
    return targets


def find_layers(model, pattern):
    """Layers of `model` (outside the backbone's blocks too) whose path matches `pattern`; a preset
    means the projections it names in the backbone's blocks."""
    if isinstance(pattern, str) and pattern in PRESETS:
        backbone = backbone_of(model)
        ids = _preset_ids(backbone, blocks_of(backbone), pattern, argument="trainable")
        return [layer for layer in model._flatten_layers(include_self=False, recursive=True) if id(layer) in ids]
    found = [layer for layer in model._flatten_layers(include_self=False, recursive=True) if _matches(layer.path, pattern)]
    if pattern and not found:
        names = [layer.path for layer in model._flatten_layers(include_self=False, recursive=True) if layer.weights and layer.path]
        raise ValueError(
            f"inject: trainable={pattern!r} matched no layer. Layers with weights: "
            f"{difflib.get_close_matches(str(pattern), names, n=6, cutoff=0.2) or names[:10]}."
        )
    return found
