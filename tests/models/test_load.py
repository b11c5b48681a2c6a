"""load: plain KerasHub objects for each task, and parity with transformers on the real checkpoints.

The real-model tests share one SmolLM2 causal LM, one transformers reference and one MiniLM of each
kind (see conftest.py and the module fixtures below).
"""

import numpy as np
import pytest

from keras_biasinject.models import load
from keras_biasinject.models.load import resolve_preset
from tests.models import tiny_gguf as tiny
from tests.models.tiny_gguf import write_tiny_gguf

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Café au lait, s'il vous plaît: 3 sugars?",  # accents: Hugging Face strips them
    "short",
]


# ---- arguments and specs (no model is built) -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(task="seq2seq"), ValueError, r"task='seq2seq' is not one of \(None, 'causal_lm', 'classifier'\)"),
        (dict(task="classifier"), ValueError, r"task='classifier' needs num_classes, an integer >= 2; got num_classes=None"),
        (dict(task="classifier", num_classes=1), ValueError, r"got num_classes=1"),
        (dict(num_classes=3), ValueError, r"num_classes=3 is only used with task='classifier'; got task=None"),
        (dict(task="causal_lm", sequence_length=0), ValueError, r"load: `sequence_length` must be a positive integer or None. Got sequence_length=0"),
        (dict(sequence_length=64), ValueError, r"sequence_length=64 is a preprocessor setting and task=None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load("minilm-l6", **kwargs)


def test_bad_specs(tmp_path):
    with pytest.raises(TypeError, match=r"spec must be a string or path; got int: 3"):
        load(3)
    with pytest.raises(ValueError, match=r"spec='.*missing\.gguf' looks like a path but does not exist"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"spec='model\.gguf' looks like a path"):
        load("model.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"spec='.*weights\.bin' is a file but not a `\.gguf` file"):
        load(tmp_path / "weights.bin")


def test_preset_names_and_handles_pass_through_to_keras_hub(tmp_path):
    for name in ("bert_tiny_en_uncased", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "kaggle://keras/bert/keras/bert_tiny_en_uncased"):
        assert resolve_preset(name) == name
    assert resolve_preset(tmp_path) == str(tmp_path)


# ---- the tiny Llama GGUF: every task kind, fast ------------------------------------------------


def test_tiny_backbone_gets_the_settings_keras_hub_drops(tiny_llama_gguf):
    path, _ = tiny_llama_gguf
    backbone = load(path, dtype="bfloat16")
    assert type(backbone).__name__ == "Llama3Backbone"
    assert backbone.layer_norm_epsilon == tiny.RMS_EPS  # KerasHub's converter would leave 1e-6
    assert backbone.rope_max_wavelength == tiny.ROPE_THETA
    assert backbone.dtype_policy.name == "bfloat16"


@pytest.mark.slow
def test_tiny_causal_lm_generates_without_a_start_token(tiny_llama_gguf):
    path, _ = tiny_llama_gguf
    lm = load(path, task="causal_lm", sequence_length=16)
    assert type(lm).__name__ == "Llama3CausalLM"
    assert lm.preprocessor.sequence_length == 16
    ids = np.asarray(lm.preprocessor.generate_preprocess(" the")["token_ids"])
    assert ids[:2].tolist() == [tiny.TOKENS.index("Ġthe"), 0]  # no <|im_start|> in front, then padding
    x, y, w = lm.preprocessor([" the he"])
    assert np.asarray(x["token_ids"])[0, :3].tolist() == [tiny.TOKENS.index("Ġthe"), tiny.TOKENS.index("Ġ"), tiny.TOKENS.index("he")]
    text = lm.generate(" the", max_length=8)
    assert isinstance(text, str) and text.startswith(" the")


def test_loaded_tasks_are_built_so_keras_traces_them_once(tiny_llama_gguf, monkeypatch):
    """KerasHub leaves a tokenizer that was never called unbuilt, and Keras then re-traces the whole
    model symbolically at every `train_on_batch`, `fit` and `evaluate` (on JAX and torch always, on
    TensorFlow under a distribution strategy; 0.5-1 s a SmolLM2 step on JAX): `load` marks them built.
    Unfixed, each later call traces the model again."""
    import keras
    import tensorflow as tf
    from keras.src.trainers import trainer

    path, _ = tiny_llama_gguf
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():  # as `kbi finetune --strategy` builds it
        lm = load(path, task="causal_lm", sequence_length=8)
        assert [type(layer).__name__ for layer in lm._flatten_layers() if not layer.built] == []
        lm.preprocessor = None  # token ids in; the preprocessor's layers stay tracked by the model
        lm.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    traces = []
    real = trainer.backend.compute_output_spec
    monkeypatch.setattr(trainer.backend, "compute_output_spec", lambda *a, **k: traces.append(1) or real(*a, **k))
    x, y = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), "int32")}, np.ones((2, 8), "int32")
    lm.train_on_batch(x, y)
    assert len(traces) == 3  # the first call builds the model's, the metrics' and the loss's state
    lm.train_on_batch(x, y)
    lm.train_on_batch(x, y)
    assert len(traces) == 3  # and no call after it traces anything


def test_tiny_causal_lm_keeps_the_start_token_when_the_tokenizer_adds_one(tmp_path):
    write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    lm = load(tmp_path / "bos.gguf", task="causal_lm", sequence_length=8)
    ids = np.asarray(lm.preprocessor.generate_preprocess(" the")["token_ids"])
    assert ids[:2].tolist() == [1, tiny.TOKENS.index("Ġthe")]


def test_tiny_llama_has_no_classifier(tiny_llama_gguf):
    path, _ = tiny_llama_gguf
    with pytest.raises(ValueError, match=r"KerasHub has no TextClassifier for Llama3Backbone .*task='classifier'"):
        load(path, task="classifier", num_classes=2)


# ---- SmolLM2-135M against transformers' LlamaForCausalLM on the same converted folder ------------


def smollm2_prompts(tokenizer):
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    return ["The capital of France is", "Once upon a time, in a small village,", chat]


@pytest.mark.slow
def test_smollm2_tokens_and_logits_match_transformers(smollm2_lm, smollm2_transformers):
    import torch

    tokenizer, reference = smollm2_transformers
    for prompt in smollm2_prompts(tokenizer):
        want_ids = tokenizer(prompt)["input_ids"]
        packed = smollm2_lm.preprocessor.generate_preprocess(prompt)
        lm_ids = np.asarray(packed["token_ids"])[: len(want_ids)].tolist()
        assert lm_ids == want_ids, prompt  # no start token in front, <|im_start|> as one token
        assert smollm2_lm.preprocessor.tokenizer.end_token_id == tokenizer.eos_token_id == 2  # <|im_end|>
        assert int(np.asarray(packed["padding_mask"]).sum()) == len(want_ids)
        with torch.no_grad():
            want = reference(torch.tensor([want_ids])).logits.numpy()
        ids = np.array([want_ids])
        hidden = smollm2_lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
        got = np.asarray(smollm2_lm.backbone.token_embedding(hidden, reverse=True))
        # float32 through 30 layers, logits up to ~30: 7e-5 observed; 1e-2 if rms_norm_eps were lost.
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=prompt)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2_lm, smollm2_transformers):
    import torch

    tokenizer, reference = smollm2_transformers
    prompts = smollm2_prompts(tokenizer)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    # One batch, so one trace: every prompt gets at least 20 new tokens.
    max_length = max(len(ids) for ids in prompt_ids) + 20
    got = smollm2_lm.generate(prompts, max_length=max_length, stop_token_ids=None)
    for prompt, ids, text in zip(prompts, prompt_ids, got):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2
            )[0].tolist()
        assert len(out) == len(ids) + 20  # transformers did not stop early
        want = tokenizer.decode(out, skip_special_tokens=True)
        # The first 20 new tokens are identical (greedy, no stop token on either side).
        assert text.startswith(want), (prompt, text, want)


# ---- all-MiniLM-L6-v2 against transformers' AutoModel ---------------------------------------------


@pytest.fixture(scope="module")
def minilm_classifier():
    return load("minilm-l6", task="classifier", num_classes=3, sequence_length=32)


@pytest.mark.slow
def test_minilm_classifier(minilm_classifier):
    assert type(minilm_classifier).__name__ == "MeanPooledTextClassifier"  # its 1_Pooling folder: mean (test_pooling.py)
    assert minilm_classifier.preprocessor.sequence_length == 32
    assert minilm_classifier.predict(SENTENCES, verbose=0).shape == (len(SENTENCES), 3)


@pytest.mark.slow
def test_minilm_sentence_embeddings_match_transformers(minilm_classifier):
    import torch
    import transformers

    folder = resolve_preset("minilm-l6")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**encoded).last_hidden_state.numpy()

    backbone = load("minilm-l6")
    assert type(backbone).__name__ == "BertBackbone"
    x = minilm_classifier.preprocessor(SENTENCES)
    np.testing.assert_array_equal(np.asarray(x["token_ids"]), encoded["input_ids"].numpy())
    got = np.asarray(backbone(x)["sequence_output"])

    def embed(states, mask):  # sentence-transformers: mean over real tokens, then L2-normalize
        mask = np.asarray(mask, np.float32)[..., None]
        mean = (states * mask).sum(1) / mask.sum(1)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)

    cosine = (embed(got, x["padding_mask"]) * embed(hidden, encoded["attention_mask"].numpy())).sum(1)
    # KerasHub's BERT uses the tanh GELU, transformers the exact one: about 0.999999 observed.
    assert np.all(cosine >= 0.9999), cosine
