"""`InjectionConfig`: which layers get control inputs, and what kind of adapter."""

import dataclasses
from typing import Optional, Sequence, Union

from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.layers.kinds import ADAPTER_KINDS
from keras_biasinject.layers.lora_bias_adapter import GATES

KINDS = tuple(ADAPTER_KINDS)  # "lora_bias" (LoRABiasAdapter), "bias" (BiasInjectDense)

# Named target sets: a layer matches when the last segment of its path is one of the names.
# KerasHub names its projections alike across families (GPT-2, BERT, Llama, Gemma, Qwen, ...).
ATTENTION = ["query", "key", "value", "attention_output"]
MLP = [
    "feedforward_intermediate_dense", "feedforward_gate_dense", "feedforward_output_dense",  # GPT-2, BERT, Llama, Qwen
    "ffw_gating", "ffw_gating_2", "ffw_linear",  # Gemma
]
PRESETS = {
    "query_value": ["query", "value"],  # as KerasHub's `enable_lora`
    "attention": ATTENTION,
    "mlp": MLP,
    "all-linear": ATTENTION + MLP,
}

Pattern = Union[str, Sequence[str], None]


@dataclasses.dataclass
class InjectionConfig:
    """What `inject` splices. A pattern is a preset name, a regex (fullmatch on `layer.path`), or a
    list of path suffixes (`["query", "self_attention/value"]`)."""

    targets: Pattern = "query_value"  # layers to adapt; presets: query_value, attention, mlp, all-linear
    exclude: Pattern = None  # layers never to adapt, even if `targets` matched them
    blocks: Optional[Sequence[int]] = None  # transformer block indices to adapt (None: all); negatives count from the end
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
        for name in ("rank", "control_dim"):
            check_positive_int(getattr(self, name), name, "InjectionConfig")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"InjectionConfig: `alpha` must be a positive number or None. Got alpha={self.alpha!r}.")
        if self.kind == "bias" and self.gate == "always":
            raise ValueError(
                "InjectionConfig: kind='bias' adds only (c - neutral) V, which is zero at the neutral "
                "control; gate='always' has no meaning there. Use gate='control' or kind='lora_bias'."
            )
        for name in ("targets", "exclude", "trainable"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError(
                    f"InjectionConfig: `{name}` must be a preset name, a regex string or a list of "
                    f"path suffixes. Got {name}={value!r}."
                )
            setattr(self, name, list(value))
        if self.blocks is not None:
            if isinstance(self.blocks, range):
                self.blocks = list(self.blocks)
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in self.blocks):
                raise ValueError(f"InjectionConfig: `blocks` must be a list of block indices. Got blocks={self.blocks!r}.")
            self.blocks = list(self.blocks)
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
