"""How a test describes one KerasHub family: a tiny config that builds without downloads."""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Family:
    """One KerasHub family as the coverage tests build it (hidden 16, 2 layers, vocabulary <= 256)."""

    backbone: str  # keras_hub.models class name, e.g. "GPT2Backbone"
    kwargs: dict  # constructor arguments of the tiny config
    inputs: dict  # backbone input name -> "tokens" (ints in [1, V)), "mask" (ones), "zeros", "positions" (0..T-1),
    # "features" ([B, T, num_mels] floats), "audio" ([B, samples, 1] floats) or "audio_mask" ([B, samples] bools)
    task: Optional[str] = None  # keras_hub.models task class built over it (CausalLM, Seq2SeqLM, TextClassifier), or None
    presets: tuple = ("query_value", "attention", "mlp", "all-linear")  # presets this family can express
    per_token: bool = True  # takes per-token controls [B, T, dim] (encoder-decoders never do; see takes_per_token)


# The shared pieces of the tiny configs (tiny_models.py: A..L, tiny_models_more.py: M..Z).
V = 256  # vocabulary
DECODER = dict(vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32)
GQA = dict(DECODER, num_query_heads=4, num_key_value_heads=2)  # 4 query heads of 4, sharing 2 key/value heads
ENCODER = dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=32)

TOKENS = {"token_ids": "tokens", "padding_mask": "mask"}
SEGMENTS = dict(TOKENS, segment_ids="zeros")
SEQ2SEQ = {"encoder_token_ids": "tokens", "encoder_padding_mask": "mask", "decoder_token_ids": "tokens", "decoder_padding_mask": "mask"}
# Presets a family cannot express (inject raises ValueError for them; test_families checks that):
ALL = ("query_value", "attention", "mlp", "all-linear")
NO_QUERY_VALUE = ("attention", "mlp", "all-linear")  # q/v named unlike KerasHub's default_lora_layer_names(), or fused qkv
NO_ATTENTION = ("mlp", "all-linear")  # FNet mixes tokens with a Fourier transform: no attention projections
NO_MLP = ("query_value", "attention", "all-linear")  # MoE experts are raw weights; only the routers are Dense
