"""Tiny configs of the KerasHub 0.32 backbones whose class names start with M..Z (no downloads).

`MORE`: family name -> `Family` for every text backbone whose blocks hold Dense/EinsumDense projections
(hidden 16, 2 layers, vocabulary 256, few heads; each builds in about a second, T5 in about 7), with the
presets it can express (keras_biasinject/rewrite/targets.py says what each preset means).
`UNCOVERED_MORE`: backbone class name -> why `inject` is not tested on it.
"""

from tests.rewrite.family_spec import ALL, DECODER, ENCODER, GQA, NO_MLP, NO_QUERY_VALUE, SEGMENTS, SEQ2SEQ, TOKENS, V, Family

MOE = dict(num_experts=2, top_k=1)  # 2 experts, 1 per token
LINEAR_ATTENTION = dict(  # Qwen3.5: block 0 is a gated delta-net ("linear_attention"), block 1 full attention
    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
    linear_key_head_dim=4, linear_value_head_dim=4, partial_rotary_factor=0.5,  # rope on 2 of head_dim 4 (must be even)
)
SMOL = dict(  # SmolLM and SmolLM3 take every argument explicitly
    vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32, num_attention_heads=4, num_key_value_heads=2,
    attention_bias=False, attention_dropout=0.0, mlp_bias=False, layer_norm_epsilon=1e-6, rope_theta=10000.0,
    rope_layer_enabled_list=[True, False], layer_types=["attention", "attention"], max_position_embeddings=32,
    partial_rotary_factor=1.0,
)
T5GEMMA = dict(  # encoder and decoder: 2 blocks each, 4 query heads of 4, 2 key/value heads
    vocabulary_size=V, sliding_window=16,
    encoder_hidden_dim=16, encoder_intermediate_dim=32, encoder_num_layers=2, encoder_num_attention_heads=4,
    encoder_num_key_value_heads=2, encoder_head_dim=4, encoder_layer_types=["sliding_attention", "full_attention"],
    decoder_hidden_dim=16, decoder_intermediate_dim=32, decoder_num_layers=2, decoder_num_attention_heads=4,
    decoder_num_key_value_heads=2, decoder_head_dim=4, decoder_layer_types=["sliding_attention", "full_attention"],
)


MORE = {
    # The families tested before the whole M..Z list (same configs as then).
    "Mistral": Family("MistralBackbone", dict(GQA, sliding_window=32), TOKENS, "MistralCausalLM", ALL),
    "OPT": Family("OPTBackbone", dict(DECODER, num_heads=2, max_sequence_length=32), TOKENS, "OPTCausalLM", ALL),
    "Phi3": Family("Phi3Backbone", dict(GQA, max_sequence_length=32, pretraining_sequence_length=32), TOKENS, "Phi3CausalLM", ALL),
    "Qwen": Family("QwenBackbone", GQA, TOKENS, "QwenCausalLM", ALL),
    "Qwen3": Family("Qwen3Backbone", dict(GQA, head_dim=4), TOKENS, "Qwen3CausalLM", ALL),
    "RoBERTa": Family("RobertaBackbone", ENCODER, TOKENS, "RobertaTextClassifier", ALL),
    # Decoders.
    "Mixtral": Family("MixtralBackbone", dict(GQA, sliding_window=32, **MOE), TOKENS, "MixtralCausalLM", NO_MLP),
    "Qwen2": Family("Qwen2Backbone", GQA, TOKENS, "Qwen2CausalLM", ALL),
    "QwenMoe": Family(
        "QwenMoeBackbone", dict(GQA, moe_intermediate_dim=8, shared_expert_intermediate_dim=16, **MOE), TOKENS, "QwenMoeCausalLM", ALL
    ),
    "Qwen3Moe": Family("Qwen3MoeBackbone", dict(GQA, head_dim=4, moe_intermediate_dim=8, **MOE), TOKENS, "Qwen3MoeCausalLM", NO_MLP),
    # query_value reaches only the full-attention block: the linear-attention one holds no layer KerasHub's LoRA names.
    "Qwen3_5": Family("Qwen3_5Backbone", dict(GQA, head_dim=4, **LINEAR_ATTENTION), TOKENS, "Qwen3_5CausalLM", ALL),
    "Qwen3_5Moe": Family(
        "Qwen3_5MoeBackbone",
        dict(vocabulary_size=V, num_layers=2, hidden_dim=16, num_query_heads=4, num_key_value_heads=2, head_dim=4,
             moe_intermediate_dim=8, shared_expert_intermediate_size=16, **MOE, **LINEAR_ATTENTION),
        TOKENS, "Qwen3_5MoeCausalLM", ALL,
    ),
    "SmolLM": Family("SmolLMBackbone", SMOL, TOKENS, "SmolLMCausalLM", NO_QUERY_VALUE),  # the same class as SmolLM3
    "SmolLM3": Family("SmolLM3Backbone", SMOL, TOKENS, "SmolLM3CausalLM", NO_QUERY_VALUE),
    # RWKV-7: recurrent blocks (`rwkv_layers`); time-mix counts as attention, channel-mix as mlp, and query_value
    # is its time-mix `value` alone. Its `generate` takes another token dict: token_ids and input_padding_mask (the
    # prompt but its last token), predict_token_ids (that token, then zeros) and padding_mask (predict_token_ids != 0).
    "RWKV7": Family(
        "RWKV7Backbone", dict(vocabulary_size=V, num_layers=2, hidden_size=16, head_size=8, intermediate_dim=32, gate_lora=4,
                              mv_lora=4, aaa_lora=4, decay_lora=4), TOKENS, "RWKV7CausalLM", ALL,
    ),
    # Encoders.
    "RoformerV2": Family(
        "RoformerV2Backbone", dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, head_size=8),
        {"token_ids": "tokens", "segment_ids": "zeros"}, "RoformerV2TextClassifier", NO_QUERY_VALUE,
    ),
    "XLMRoberta": Family("XLMRobertaBackbone", ENCODER, TOKENS, "XLMRobertaTextClassifier", ALL),
    # XLNet: attention and all-linear are refused: its attention output is EinsumDense "ibnd,hnd->ibh", which adapters
    # do not support yet. No task class: the bare backbone (its output is the sequence, [batch, seq, hidden]).
    "XLNet": Family(
        "XLNetBackbone", dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32), SEGMENTS, None,
        ("query_value", "mlp"),
    ),
    # Encoder-decoders: one control per example (a per-token one is refused: encoder and decoder lengths differ).
    # T5 takes about 7 s to build (its symbolic trace on TensorFlow), whatever its size.
    "T5": Family(
        "T5Backbone", dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32), SEQ2SEQ, "T5Seq2SeqLM",
        NO_QUERY_VALUE,
    ),
    "T5Gemma": Family("T5GemmaBackbone", T5GEMMA, SEQ2SEQ, "T5GemmaSeq2SeqLM", ALL),
    "T5Gemma2": Family("T5Gemma2Backbone", T5GEMMA, SEQ2SEQ, "T5Gemma2Seq2SeqLM", ALL),
    # Audio in, text out: the encoder reads [B, T, num_mels] features; KerasHub 0.32 has no Whisper task class.
    "Whisper": Family(
        "WhisperBackbone", dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, num_mels=8,
                                max_encoder_sequence_length=16, max_decoder_sequence_length=16),
        {"encoder_features": "features", "decoder_token_ids": "tokens", "decoder_padding_mask": "mask"}, None, ALL,
    ),
    "Moonshine": Family(  # raw audio in (the mask covers the samples), text out; the task needs an audio preprocessor
        "MoonshineBackbone", dict(vocabulary_size=V, filter_dim=16, encoder_num_layers=2, decoder_num_layers=2, hidden_dim=16,
                                  intermediate_dim=32, encoder_num_heads=2, decoder_num_heads=2, max_position_embeddings=64),
        {"encoder_input_values": "audio", "encoder_padding_mask": "audio_mask", "decoder_token_ids": "tokens",
         "decoder_padding_mask": "mask"}, None, ALL,
    ),
}

UNCOVERED_MORE = {
    "MetaCLIP2Backbone": "image-text dual encoder: inputs include images",
    "MiTBackbone": "vision only",
    "MobileNetBackbone": "vision only (convolutional, no transformer blocks)",
    "MobileNetV5Backbone": "vision only",
    "PARSeqBackbone": "scene-text recognition: a text decoder over an image encoder; inputs include images",
    "PaliGemmaBackbone": "vision-language: always has a ViT encoder and takes images",
    "ResNetBackbone": "vision only (convolutional, no transformer blocks)",
    "RetinaNetBackbone": "vision only (object detection)",
    "SAM3PromptableConceptBackbone": "image segmentation prompted by text and boxes: inputs include images",
    "SAMBackbone": "vision only (segmentation prompted by points, boxes or masks)",
    "SegFormerBackbone": "vision only (segmentation)",
    "SigLIPBackbone": "image-text dual encoder: inputs include images",
    "StableDiffusion3Backbone": "image generation (diffusion): inputs include images and latents",
    "SwinTransformerBackbone": "vision only",
    "VGGBackbone": "vision only (convolutional, no transformer blocks)",
    "ViTBackbone": "vision only",
    "ViTDetBackbone": "vision only",
    "VideoPrismBackbone": "video (with an optional text tower): inputs are video frames",
    "XceptionBackbone": "vision only (convolutional, no transformer blocks)",
}
