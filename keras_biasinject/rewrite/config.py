"""`InjectionConfig`: which layers get control inputs, and what kind of adapter."""

import dataclasses
import re
from typing import Optional, Sequence, Union

from keras_biasinject.layers.checks import check_index, check_positive_int, check_positive_number
from keras_biasinject.layers.control import check_neutral
from keras_biasinject.layers.kinds import ADAPTER_KINDS
from keras_biasinject.layers.lora_bias_adapter import GATES

KINDS = tuple(ADAPTER_KINDS)  # "lora_bias" (LoRABiasAdapter), "bias" (BiasInjectDense)

# Named target sets, read from each model's structure so that each means the same on every family
# (keras_biasinject/rewrite/targets.py finds them; a projection is a Dense or EinsumDense in a block).
PRESETS = {
    "query_value": "the layers KerasHub's own enable_lora picks by name (backbone.default_lora_layer_names())",
    "attention": "every projection inside the attention sublayers of each block (self- and cross-attention)",
    "mlp": "the feed-forward projections of each block (outside attention; MoE routers excluded)",
    "all-linear": "every projection in the blocks",
}

Pattern = Union[str, Sequence[str], None]


@dataclasses.dataclass
class InjectionConfig:
    """What `inject` splices. A pattern is a preset name, a regex (fullmatch on `layer.path`), or a
    list of path suffixes (`["query", "self_attention/value"]`)."""

    targets: Pattern = "query_value"  # layers to adapt; presets: query_value, attention, mlp, all-linear
    exclude: Pattern = None  # layers never to adapt, even if `targets` matched them
    blocks: Optional[Sequence[int]] = None  # block indices (None: all; negatives from the end); encoder-decoder: encoder's, then decoder's
    kind: str = "lora_bias"  # "lora_bias" (LoRABiasAdapter) or "bias" (BiasInjectDense: control bias only)
    rank: int = 8  # rank of the low-rank update (kind "lora_bias")
    alpha: Optional[float] = None  # update scale numerator, alpha / rank; None means rank
    control_dim: int = 1  # width of the control input
    neutral: Union[float, Sequence[float]] = 0.0  # the control at which the model is the base model
    gate: str = "control"  # "control": exact off switch at neutral; "always": LoRA at neutral, scaled by the control
    trainable: Sequence[str] = ()  # extra layers to train (path suffixes or a regex), e.g. a task head

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"InjectionConfig: `kind` must be one of {list(KINDS)}. Got kind={self.kind!r}.")
        if self.gate not in GATES:
            raise ValueError(f"InjectionConfig: `gate` must be one of {sorted(GATES)}. Got gate={self.gate!r}.")
        for name in ("rank", "control_dim"):  # numpy integers pass, as Python ints (so that to_dict is JSON)
            setattr(self, name, check_positive_int(getattr(self, name), name, "InjectionConfig"))
        self.alpha = check_positive_number(self.alpha, "alpha", "InjectionConfig", allow_none=True)
        self.neutral = check_neutral(self.neutral, self.control_dim, "InjectionConfig")
        if self.kind == "bias" and self.gate == "always":
            raise ValueError(
                "InjectionConfig: kind='bias' adds only (c - neutral) V, which is zero at the neutral "
                "control; gate='always' has no meaning there. Use gate='control' or kind='lora_bias'."
            )
        if self.targets is None:
            raise ValueError(f"InjectionConfig: `targets` must name the layers to adapt: a preset ({sorted(PRESETS)}), "
                             "a regex or a list of path suffixes. Got targets=None.")
        for name in ("targets", "exclude", "trainable"):
            setattr(self, name, _pattern(getattr(self, name), name))
        self.blocks = _blocks(self.blocks)
        if self.trainable is None:
            self.trainable = []

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"InjectionConfig: unknown keys {unknown}; allowed keys are {sorted(known)}.")
        return cls(**data)


def _pattern(value, name):
    """A pattern checked: None, a preset, a regex that compiles, or a list of non-empty path suffixes."""
    if value is None or (isinstance(value, str) and value in PRESETS):
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"InjectionConfig: `{name}`={value!r} is not a valid regex ({error}). Fix the pattern, "
                             f"or give a preset ({sorted(PRESETS)}) or a list of path suffixes.") from None
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(
            f"InjectionConfig: `{name}` must be a preset name, a regex string or a list of "
            f"path suffixes. Got {name}={value!r}."
        )
    return list(value)


def _blocks(blocks):
    """None, or a list of block indices (Python or numpy integers; negatives count from the end)."""
    if blocks is None:
        return None
    if not isinstance(blocks, (list, tuple, range)):
        raise ValueError(f"InjectionConfig: `blocks` must be a list of block indices (e.g. [0, 1] or [-1]) or None "
                         f"for all blocks. Got blocks={blocks!r}.")
    try:
        return [check_index(b, "blocks", "InjectionConfig") for b in blocks]
    except ValueError:
        raise ValueError(f"InjectionConfig: `blocks` must be a list of block indices. Got blocks={blocks!r}.") from None
