"""A tiny random Llama written as a GGUF file the way llama.cpp writes one (no downloads).

2 blocks, hidden 64, 4 query heads and 2 key/value heads of 16, feed-forward 128, a byte-level BPE
vocabulary of 262 tokens (3 special, 256 bytes, 3 merges). Quantized blocks run along a row (32
values), so every row length is a multiple of 32.
"""

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, CONTEXT = 64, 128, 4, 2, 2, 64
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA = 1e-5, 50000.0  # neither is a KerasHub or transformers default
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"

# Tensor type per GGUF block tensor name: every supported type appears at least once.
BLOCK_TYPES = {
    "attn_norm.weight": Q.F32,
    "attn_q.weight": Q.Q4_0,
    "attn_k.weight": Q.Q4_1,
    "attn_v.weight": Q.Q8_0,
    "attn_output.weight": Q.F16,
    "ffn_norm.weight": Q.F32,
    "ffn_gate.weight": Q.Q8_0,
    "ffn_up.weight": Q.F32,
    "ffn_down.weight": Q.Q4_1,
}
HF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def byte_tokens():
    """GPT-2's printable stand-ins for the 256 bytes, in its order (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


TOKENS = SPECIAL + byte_tokens() + ["Ġt", "he", "Ġthe"]
VOCAB = len(TOKENS)


def llama_cpp_permute(w, n_heads):
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied to q and k rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tie, seed=0):
    """Random weights in Hugging Face layout and naming: {name: float32 (rows, cols)}."""
    rng = np.random.default_rng(seed)
    shapes = {
        "attn_q.weight": (HIDDEN, HIDDEN),
        "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output.weight": (HIDDEN, HIDDEN),
        "ffn_gate.weight": (FFN, HIDDEN),
        "ffn_up.weight": (FFN, HIDDEN),
        "ffn_down.weight": (HIDDEN, FFN),
    }
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN)), "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN)}
    if not tie:
        w["lm_head.weight"] = rng.normal(0, 0.1, (VOCAB, HIDDEN))
    for i in range(LAYERS):
        for name, hf in HF_BLOCK.items():
            shape = shapes.get(name, (HIDDEN,))
            scale = 0.1 if len(shape) == 2 else 1.0
            values = rng.normal(0, scale, shape) + (1.0 if len(shape) == 1 else 0.0)
            w[f"model.layers.{i}.{hf}"] = values
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path, *, tie=True, arch="llama", tokenizer_model="gpt2", types=None, add_bos=False, seed=0):
    """Write the tiny model to `path`; return the weights the converter must produce (HF layout).

    The returned weights are what each tensor's type can represent: `dequantize(quantize(w))`. The
    quantized blocks lie along rows, so this commutes with llama.cpp's row permutation of q and k.
    """
    types = {**BLOCK_TYPES, **(types or {})}
    weights = hf_weights(tie, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (VOCAB - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected = {}

    def add(gguf_name, hf_name, qtype, heads=None):
        w = weights[hf_name]
        stored = llama_cpp_permute(w, heads) if heads else w
        data = gguf.quants.quantize(stored, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)

    add("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", Q.F32)
    if not tie:
        add("output.weight", "lm_head.weight", Q.F16)
    for i in range(LAYERS):
        for name, hf in HF_BLOCK.items():
            heads = {"attn_q.weight": HEADS, "attn_k.weight": KV_HEADS}.get(name)
            add(f"blk.{i}.{name}", f"model.layers.{i}.{hf}", types[name], heads)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, weights
