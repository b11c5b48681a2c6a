"""convert_gguf: weights, config and tokenizer of a tiny hand-written GGUF file, checked exactly."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from keras_biasinject.models.gguf import convert_gguf, unpermute_rows
from tests.models import tiny_gguf as tiny
from tests.models.tiny_gguf import HEADS, KV_HEADS, llama_cpp_permute, write_tiny_gguf

Q = gguf.GGMLQuantizationType


def test_unpermute_rows_by_hand():
    # One head of 4 rows: llama.cpp stores HF rows in the order 0, 2, 1, 3 (pairs neighbours).
    hf = np.arange(8.0).reshape(4, 2)
    stored = hf[[0, 2, 1, 3]]
    np.testing.assert_array_equal(llama_cpp_permute(hf, 1), stored)
    np.testing.assert_array_equal(unpermute_rows(stored, 1), hf)
    # Two heads of 4 rows: the same within each head.
    hf = np.arange(16.0).reshape(8, 2)
    np.testing.assert_array_equal(unpermute_rows(hf[[0, 2, 1, 3, 4, 6, 5, 7]], 2), hf)


@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 64), (4, 16)])
def test_unpermute_rows_inverts_llama_cpp(heads, head_dim):
    w = np.random.default_rng(0).normal(size=(heads * head_dim, 24))
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
def test_weights_round_trip_exactly(tmp_path, tie):
    expected, _ = write_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        # Exact: dequantization, the reversed dimensions and the q/k unpermutation lose nothing.
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in got) is not tie


def test_dequantized_values_are_within_one_quantization_step(tmp_path):
    """Against the original float weights: the converter does not merely agree with itself."""
    _, original = write_tiny_gguf(tmp_path / "tiny.gguf", tie=False)
    got = load_file(str(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf") / "model.safetensors"))
    # Largest error per 32-value block. Q8_0 and Q4_1 round to the nearest step (amax/127,
    # (max-min)/15): a full step, not half, leaves room for their float16 scales. Q4_0's levels are
    # -8..7 steps of amax/8 with the sign of the largest value, so a value of the other sign can
    # clip by up to one step; the extra 1% covers its float16 scale.
    steps = {
        Q.Q8_0: lambda b: np.abs(b).max(-1, keepdims=True) / 127,
        Q.Q4_0: lambda b: np.abs(b).max(-1, keepdims=True) / 8 * 1.01,
        Q.Q4_1: lambda b: np.ptp(b, -1, keepdims=True) / 15,
    }
    types = {"model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.F16, "model.norm.weight": Q.F32}
    for name, hf in tiny.HF_BLOCK.items():
        types.update({f"model.layers.{i}.{hf}": tiny.BLOCK_TYPES[name] for i in range(tiny.LAYERS)})
    for name, qtype in types.items():
        w, g = original[name], got[name]
        if qtype == Q.F32:
            np.testing.assert_array_equal(g, w, err_msg=name)
        elif qtype == Q.F16:
            # float16 rounding: half a unit in the last place, or one step among subnormals (< 6e-5)
            np.testing.assert_allclose(g, w, rtol=2**-11, atol=2**-24, err_msg=name)
        else:
            blocks_w, blocks_g = w.reshape(-1, 32), g.reshape(-1, 32)
            assert np.all(np.abs(blocks_g - blocks_w) <= steps[qtype](blocks_w)), name


def test_config_from_metadata(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    config = json.loads((convert_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["vocab_size"] == tiny.VOCAB
    assert config["rms_norm_eps"] == 1e-5  # stored as float32 9.99999975e-06, written back short
    assert config["rope_theta"] == 50000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["max_position_embeddings"] == 64


def test_tokenizer_files(tiny_llama_gguf, tmp_path):
    path, _ = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "hf")
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["model"]["vocab"]["Ġthe"] == tiny.VOCAB - 1
    assert tokenizer["model"]["merges"] == tiny.MERGES
    assert [(t["id"], t["content"], t["special"]) for t in tokenizer["added_tokens"]] == [
        (0, "<|endoftext|>", True), (1, "<|im_start|>", True), (2, "<|im_end|>", True)
    ]
    assert tokenizer["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False
    assert config["chat_template"] == tiny.CHAT_TEMPLATE


def test_tokenizer_encodes_like_the_merges_say(tiny_llama_gguf, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")  # installed with transformers (test extra)
    path, _ = tiny_llama_gguf
    tok = tokenizers.Tokenizer.from_file(str(convert_gguf(path, tmp_path / "hf") / "tokenizer.json"))
    vocab = {t: i for i, t in enumerate(tiny.TOKENS)}
    # " the" -> Ġ t h e -> Ġt he -> Ġthe; "the" has no Ġ, so stays t + he; <|im_end|> is one token;
    # digits are split one by one; no start token is added (add_bos_token is false).
    assert tok.encode(" the<|im_end|>the 12").ids == [
        vocab["Ġthe"], 2, vocab["t"], vocab["he"], vocab["Ġ"], vocab["1"], vocab["2"]
    ]
    assert tok.decode(tok.encode(" the théâtre 12").ids) == " the théâtre 12"


def test_rejects_other_architectures_before_writing(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"general\.architecture='gpt2'; only 'llama'"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_unsupported_tensor_type_naming_the_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "q5.gguf", types={"attn_v.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.attn_v\.weight' is Q5_0; supported types are F32, F16, Q4_0"):
        convert_gguf(tmp_path / "q5.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_sentencepiece_vocabulary(tmp_path):
    write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama'; only byte-level BPE"):
        convert_gguf(tmp_path / "spm.gguf", tmp_path / "out")


def test_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"gguf_path='.*nope\.gguf' is not a file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.mark.slow
def test_tiny_model_matches_transformers(tiny_llama_gguf, tmp_path):
    """Config, weight names and layouts as transformers reads them: same logits as KerasHub."""
    import keras_hub
    import torch
    import transformers

    path, _ = tiny_llama_gguf
    folder = str(convert_gguf(path, tmp_path / "hf"))
    ids = np.array([[1, 60, 261, 5, 2, 100, 259]])
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy()
    backbone = keras_hub.models.Llama3Backbone.from_preset(folder, layer_norm_epsilon=1e-5)
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
    got = np.asarray(backbone.token_embedding(hidden, reverse=True))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)  # float32, 2 layers, logits up to 15: 1.05e-5 seen once


@pytest.mark.slow
def test_smollm2_config(smollm2_folder):
    """The real file's metadata, as SOURCES.md lists it."""
    config = json.loads(open(f"{smollm2_folder}/config.json").read())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert (config["rope_theta"], config["rms_norm_eps"]) == (100000.0, 1e-5)
    tokenizer = json.loads(open(f"{smollm2_folder}/tokenizer.json").read())
    assert len(tokenizer["model"]["merges"]) == 48900
    assert "<|im_start|>" in json.loads(open(f"{smollm2_folder}/tokenizer_config.json").read())["chat_template"]
