"""How a test describes one KerasHub family: a tiny config that builds without downloads."""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Family:
    """One KerasHub family as the coverage tests build it (hidden 16, 2 layers, vocabulary <= 256)."""

    backbone: str  # keras_hub.models class name, e.g. "GPT2Backbone"
    kwargs: dict  # constructor arguments of the tiny config
    inputs: dict  # backbone input name -> "tokens" (ints in [1, V)), "mask" (ones), "zeros" or "positions" (0..T-1)
    task: Optional[str] = None  # keras_hub.models task class built over it (CausalLM, Seq2SeqLM, TextClassifier), or None
    presets: tuple = ("query_value", "attention", "mlp", "all-linear")  # presets this family can express
    per_token: bool = True  # takes per-token controls [B, T, dim] (encoder-decoders never do; see takes_per_token)
