"""Finding the layers to adapt: every check here runs before the model is touched."""

import dataclasses
import difflib
import re
import warnings

import keras

from keras_biasinject.rewrite.config import PRESETS


@dataclasses.dataclass(frozen=True)
class Target:
    """A projection to adapt and where it hangs: `getattr(parent, attr) is layer`."""

    path: str  # layer.path, e.g. "transformer_layer_0/self_attention/query"
    layer: keras.layers.Layer
    parent: keras.layers.Layer
    attr: str  # attribute of `parent` holding the layer, e.g. "_query_dense"
    block: int  # index of the transformer block that holds it


def _matches(path, pattern):
    """A preset name or a list matches path suffixes; any other string is a regex fullmatch."""
    if not path:
        return False
    if isinstance(pattern, str) and pattern in PRESETS:
        pattern = PRESETS[pattern]
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == suffix or path.endswith("/" + suffix) for suffix in pattern)


def blocks_of(backbone):
    """The backbone's transformer blocks, in order."""
    blocks = getattr(backbone, "transformer_layers", None)
    if not blocks:
        raise ValueError(
            f"inject: {type(backbone).__name__} has no `transformer_layers`; inject supports KerasHub "
            "text backbones built from transformer blocks (GPT2, BERT, Llama, Gemma, Qwen, Mistral, Phi3, "
            "OPT, ...)."
        )
    return list(blocks)


def _holders(block):
    """Maps id(layer) -> (parent, attribute) for every sublayer held directly as an attribute."""
    holders = {}
    for parent in block._flatten_layers(include_self=True, recursive=True):
        for attr, value in vars(parent).items():
            if isinstance(value, keras.layers.Layer) and value is not parent:
                holders.setdefault(id(value), (parent, attr))
    return holders


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

    candidates, targets, excluded = [], [], []
    for index, block in enumerate(blocks):
        holders = _holders(block)
        for layer in block._flatten_layers(include_self=False, recursive=True):
            if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
                continue
            candidates.append(layer.path)
            if index not in chosen or not _matches(layer.path, config.targets):
                continue
            if config.exclude is not None and _matches(layer.path, config.exclude):
                excluded.append(layer.path)
                continue
            if id(layer) not in holders:
                raise ValueError(f"inject: layer '{layer.path}' is not held by an attribute of its parent; it cannot be spliced.")
            parent, attr = holders[id(layer)]
            targets.append(Target(layer.path, layer, parent, attr, index))

    if not targets:
        names = sorted({path.rsplit("/", 1)[-1] for path in candidates})
        wanted = config.targets if isinstance(config.targets, str) else " ".join(config.targets)
        close = difflib.get_close_matches(str(wanted), names + candidates, n=6, cutoff=0.3)
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
    """Layers of `model` (outside the backbone's blocks too) whose path matches `pattern`."""
    found = [layer for layer in model._flatten_layers(include_self=False, recursive=True) if _matches(layer.path, pattern)]
    if pattern and not found:
        names = [layer.path for layer in model._flatten_layers(include_self=False, recursive=True) if layer.weights and layer.path]
        raise ValueError(
            f"inject: trainable={pattern!r} matched no layer. Layers with weights: "
            f"{difflib.get_close_matches(str(pattern), names, n=6, cutoff=0.2) or names[:10]}."
        )
    return found
