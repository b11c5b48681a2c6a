"""Convert a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model folder.

The folder holds `config.json` (`model_type: llama`), `model.safetensors` (float32),
`tokenizer.json` (byte-level BPE), `tokenizer_config.json` and `generation_config.json`: what
KerasHub's Hugging Face converter (`Llama3Backbone`) and transformers' `LlamaForCausalLM` read.

Two things differ from a Hugging Face checkpoint and are undone here:
- GGUF lists a tensor's dimensions in reverse (`[cols, rows]`); the data is row-major `(rows, cols)`.
- llama.cpp permutes the rows of the query and key projections (its rotary embedding pairs
  neighbouring rows, Hugging Face pairs row i with row i + head_dim / 2).

Only `numpy`, `gguf` and `safetensors` are needed.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import safetensors.numpy

# Quantization types this converter dequantizes (all tested); others raise.
SUPPORTED_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")

# GGUF tensor name -> Hugging Face name. `{i}` is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
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

# `tokenizer.ggml.pre` -> the Hugging Face pre-tokenizer that llama.cpp's pre-tokenizer mirrors.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    },
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL, use_regex=False),
        ],
    },
}

# llama.cpp token types (gguf.TokenType): which become Hugging Face "added tokens", and whether special.
_ADDED_TOKEN_TYPES = {2: True, 3: True, 4: False}  # UNKNOWN, CONTROL: special; USER_DEFINED: not


def convert_gguf(gguf_path, out_dir):
    """Write a Hugging Face format folder (float32 weights, tokenizer) for a Llama GGUF file.

    Every check (architecture, tensor names, quantization types, tokenizer kind) runs before
    anything is written, so a rejected file leaves `out_dir` untouched. The float32 weights are
    held in memory while writing (540 MB for SmolLM2-135M; about 11 s on 2 CPU cores).

    Args:
        gguf_path: path to a `.gguf` file whose `general.architecture` is `llama`, with tensors in
            F32, F16, Q4_0, Q4_1 or Q8_0 and a byte-level BPE (`gpt2`) tokenizer.
        out_dir: folder to write into (created if missing).

    Returns:
        `Path(out_dir)`.

    Example:
        >>> folder = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/tmp/smollm2")
        >>> backbone = keras_hub.models.Llama3Backbone.from_preset(
        ...     str(folder), layer_norm_epsilon=1e-5)
    """
    import gguf  # imported here: reading GGUF files is the only thing that needs it

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ValueError(f"gguf_path={str(gguf_path)!r} is not a file. Pass the path of a `.gguf` file.")
    reader = gguf.GGUFReader(gguf_path)
    meta = _Metadata(reader, gguf_path)
    config = _model_config(meta, reader)
    plan = _tensor_plan(reader, config, gguf_path)
    tokenizer, tokenizer_config = _tokenizer_files(meta, config)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {}
    for hf_name, tensor, unpermute_heads in plan:
        weights[hf_name] = _dequantize(tensor, unpermute_heads, gguf)
    safetensors.numpy.save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    _write_json(out_dir / "tokenizer.json", tokenizer)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    _write_json(out_dir / "generation_config.json", generation)
    # Written last: a folder with config.json is one a loader will try to use.
    _write_json(out_dir / "config.json", config)
    return out_dir


def unpermute_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, 2, 4, ..., 1, 3, ...) -> 0..n.

    w: `(rows, cols)` with `rows = n_heads * head_dim`. Returns an array of the same shape.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class _Metadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the key."""

    def __init__(self, reader, path):
        self._fields = reader.fields
        self.path = path

    def get(self, key, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key):
        value = self.get(key)
        if value is None:
            raise ValueError(
                f"gguf_path={str(self.path)!r} lacks the metadata key {key!r}, which a Llama "
                "conversion needs. Re-export the file with a recent llama.cpp `convert_hf_to_gguf.py`."
            )
        return value


def _short_float(value):
    # GGUF stores float32; 9.999999747e-06 is written to config.json as 1e-05.
    return float(str(np.float32(value)))


def _model_config(meta, reader):
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"gguf_path={str(meta.path)!r} has general.architecture={arch!r}; only 'llama' "
            "(Llama, SmolLM, TinyLlama, ...) can be converted. Load other architectures from their "
            "Hugging Face folder or KerasHub preset instead."
        )
    for key in ("llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length"):
        if isinstance(meta.get(key), list):
            raise ValueError(
                f"gguf_path={str(meta.path)!r} has per-layer {key}={meta.get(key)}; only models with "
                "the same shape in every layer can be converted."
            )
    scaling = meta.get("llama.rope.scaling.type")
    has_rope_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if (scaling not in (None, "none")) or has_rope_freqs:
        raise ValueError(
            f"gguf_path={str(meta.path)!r} uses RoPE scaling (llama.rope.scaling.type={scaling!r}, "
            f"rope_freqs tensor: {has_rope_freqs}), which this converter does not reproduce. Load the "
            "original Hugging Face folder instead."
        )
    hidden = int(meta.require("llama.embedding_length"))
    heads = int(meta.require("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"gguf_path={str(meta.path)!r} rotates {rope_dim} of {head_dim} head dimensions "
            "(llama.rope.dimension_count); only full rotary embeddings can be converted."
        )
    tokens = meta.require("tokenizer.ggml.tokens")
    rope_theta = _short_float(meta.get("llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _short_float(meta.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _tensor_plan(reader, config, path):
    """[(hf_name, gguf tensor, heads to unpermute or None)], after checking names, types, shapes."""
    plan = []
    for tensor in reader.tensors:
        name = tensor.name
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"gguf_path={str(path)!r}: tensor {name!r} is {tensor.tensor_type.name}; supported types "
                f"are {', '.join(SUPPORTED_TYPES)}. Re-quantize the file with llama.cpp "
                "(`llama-quantize --allow-requantize in.gguf out.gguf Q8_0`) or use an F16 export."
            )
        heads = None
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _BLOCK_NAMES:
                raise ValueError(
                    f"gguf_path={str(path)!r}: tensor {name!r} is not part of a plain Llama model (known "
                    f"names: {sorted(_GLOBAL_NAMES)} and blk.N.{{{', '.join(_BLOCK_NAMES)}}})."
                )
            hf_name = f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
            if parts[2] == "attn_q.weight":
                heads = config["num_attention_heads"]
            elif parts[2] == "attn_k.weight":
                heads = config["num_key_value_heads"]
        plan.append((hf_name, tensor, heads))
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"gguf_path={str(path)!r} has no 'token_embd.weight' tensor; it is not a complete model.")
    rows, cols = (int(d) for d in reversed(embedding.shape.tolist()))
    if (rows, cols) != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(
            f"gguf_path={str(path)!r}: token_embd.weight is {rows} x {cols} but the metadata says vocabulary "
            f"{config['vocab_size']} x hidden {config['hidden_size']}; the file is inconsistent."
        )
    return plan


def _dequantize(tensor, unpermute_heads, gguf):
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dimensions reversed
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    w = np.ascontiguousarray(np.reshape(data, shape), dtype=np.float32)
    if unpermute_heads is not None:
        w = np.ascontiguousarray(unpermute_rows(w, unpermute_heads))
    return w


def _bpe_vocabulary(meta):
    """(tokens, merges, token types, pre-tokenizer name) of a byte-level BPE vocabulary, checked."""
    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"gguf_path={str(meta.path)!r} has tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2', "
            "used by Llama 3, SmolLM and most recent models) can be converted. SentencePiece ('llama') "
            "vocabularies need the original tokenizer.model."
        )
    tokens = meta.require("tokenizer.ggml.tokens")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(
            f"{meta.path.name}: tokenizer.ggml.pre={pre!r} is not one this converter knows "
            f"({sorted(_PRE_TOKENIZERS)}); using GPT-2's pre-tokenizer, so transformers may split some "
            "text differently from llama.cpp. KerasHub's tokenizer always splits like GPT-2.",
            stacklevel=4,
        )
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    return tokens, meta.require("tokenizer.ggml.merges"), types, pre


def _tokenizer_files(meta, config):
    """(tokenizer.json, tokenizer_config.json) contents for a byte-level BPE vocabulary."""
    tokens, merges, types, pre = _bpe_vocabulary(meta)

    def token(key):
        index = meta.get(key)
        return None if index is None else tokens[int(index)]

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if bos is None or eos is None:
        raise ValueError(
            f"gguf_path={str(meta.path)!r} lacks tokenizer.ggml.bos_token_id or tokenizer.ggml.eos_token_id; "
            "KerasHub's Llama 3 tokenizer needs both."
        )
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": _ADDED_TOKEN_TYPES[int(t)]}
        for i, t in enumerate(types)
        if int(t) in _ADDED_TOKEN_TYPES
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS.get(pre, _BYTE_LEVEL),
        "post_processor": _post_processor(bos if add_bos else None, eos if add_eos else None, tokens),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": token("tokenizer.ggml.unknown_token_id"),
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template") or None,
    }
    return tokenizer, {k: v for k, v in tokenizer_config.items() if v is not None}


def _post_processor(bos, eos, tokens):
    if bos is None and eos is None:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    ids = {t: tokens.index(t) for t in (bos, eos) if t is not None}

    def template(*sequences):
        pieces = [{"SpecialToken": {"id": bos, "type_id": 0}}] if bos is not None else []
        for s in sequences:
            pieces.append({"Sequence": {"id": s, "type_id": 0}})
            if eos is not None:
                pieces.append({"SpecialToken": {"id": eos, "type_id": 0}})
        return pieces

    return {
        "type": "TemplateProcessing",
        "single": template("A"),
        "pair": template("A", "B"),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ids.items()},
    }


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
