"""`:generate` and `:classify`: text in and out through the model's own preprocessor, kept beside the
export. A tiny Llama with a real byte-level tokenizer (tests/models/tiny_gguf.py) and the real MiniLM."""

import signal

import keras
import numpy as np
import pytest

from keras_biasinject import DecayFeedback, inject
from keras_biasinject.export import export_saved_model
from keras_biasinject.models import load
from tests.models.tiny_gguf import write_tiny_gguf
from tests.serving.test_server import Server, call, raw_call

pytestmark = pytest.mark.slow
PROMPTS = [" the", " he the t"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    write_tiny_gguf(folder / "tiny.gguf", tie=True)
    lm = inject(load(folder / "tiny.gguf", task="causal_lm", sequence_length=32), rank=4)
    rng = np.random.default_rng(0)
    for v in lm.trainable_weights:  # a trained-looking adapter, so that the control changes the text
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    lm.compile(sampler="greedy")
    export_saved_model(lm, folder / "serving", "lm", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    server = Server(folder / "serving" / "lm", folder / "sessions.sqlite", extra=["--max-sequence", "24"])  # and --max-batch 8
    yield lm, server
    server.kill(signal.SIGTERM)


def expected_text(lm, prompt, max_tokens, control):
    """The Keras model's own greedy generation: the prompt's tokens plus `max_tokens`, stopping at the end token."""
    prompt_tokens = np.asarray(keras.ops.convert_to_numpy(lm.preprocessor.generate_preprocess(prompt)["padding_mask"])).sum()
    return lm.generate(prompt, max_length=int(prompt_tokens) + max_tokens, control=np.array([[control]], "float32"))


def token_level(lm, server, prompt, max_tokens, control):
    """The same generation through the token-level `generate` signature (`:predict`), tokenized and
    detokenized here with the Keras model's own preprocessor: what `:generate` must answer."""
    prompt_tokens = int(np.asarray(keras.ops.convert_to_numpy(lm.preprocessor.generate_preprocess(prompt)["padding_mask"])).sum())
    x = lm.preprocessor.generate_preprocess([prompt], sequence_length=prompt_tokens + max_tokens)
    inputs = {k: np.asarray(keras.ops.convert_to_numpy(v)).astype("int32").tolist() for k, v in x.items()}
    status, body = call(server.port, "POST", "/v1/models/lm:predict",
                        {"signature_name": "generate", "inputs": {**inputs, "control": [[control]]}})
    assert status == 200, body
    ids, mask = np.array(body["outputs"]["token_ids"]), np.array(body["outputs"]["padding_mask"]).astype(bool)
    end = lm.preprocessor.tokenizer.end_token_id
    new = mask & ~np.array(inputs["padding_mask"]).astype(bool)
    new &= ~(np.cumsum(new & (ids == end), axis=1) > 0)
    return lm.preprocessor.generate_postprocess({"token_ids": ids, "padding_mask": np.array(inputs["padding_mask"]).astype(bool) | new})[0]


@pytest.mark.parametrize("control", [0.0, 2.0])
def test_generate_answers_what_the_token_level_signature_generates(llama, control):
    lm, server = llama
    status, body = call(server.port, "POST", "/v1/models/lm:generate", {"prompt": PROMPTS, "max_tokens": 6, "control": [control]})
    assert status == 200, body
    assert body["control"] == [control]
    assert all(1 <= n <= 6 for n in body["usage"]["completion_tokens"])  # 6, or fewer where the end token came first
    for prompt, text, completion in zip(PROMPTS, body["text"], body["completion"]):
        assert text == prompt + completion
    for prompt in PROMPTS:
        one = call(server.port, "POST", "/v1/models/lm:generate", {"prompt": prompt, "max_tokens": 6, "control": [control]})[1]
        assert one["text"] == token_level(lm, server, prompt, 6, control)


def test_at_the_neutral_control_generate_answers_what_keras_generates(llama):
    """The export against the Keras model itself, at the neutral control (the base model's greedy text).
    Away from it this random tiny model has near-ties that the SavedModel's graph may break otherwise."""
    lm, server = llama
    for prompt in PROMPTS:
        body = call(server.port, "POST", "/v1/models/lm:generate", {"prompt": prompt, "max_tokens": 6})[1]
        assert body["control"] == [0.0] and body["text"] == expected_text(lm, prompt, 6, 0.0)


def test_generate_defaults_to_the_neutral_control_and_reads_sessions(llama):
    lm, server = llama
    neutral = call(server.port, "POST", "/v1/models/lm:generate", {"prompt": " the", "max_tokens": 6})[1]
    assert neutral["control"] == [0.0]
    assert call(server.port, "POST", "/v1/sessions/writer/feedback", {"rating": 2.0, "timestamp": 500.0})[0] == 200
    by_session = call(server.port, "POST", "/v1/models/lm:generate", {"prompt": " the", "max_tokens": 6, "session": "writer",
                                                                     "timestamp": 500.0})[1]
    assert by_session["control"] == [2.0] and by_session["text"] == token_level(lm, server, " the", 6, 2.0)
    assert by_session["text"] != neutral["text"]  # the session's control steers it


@pytest.mark.parametrize("payload, status, message", [
    ({"prompt": " the" * 30, "max_tokens": 4}, 400, r"the prompt is \d+ tokens .* over this server's sequence length 24"),
    ({"prompt": " the", "max_tokens": 0}, 400, r"`max_tokens` must be an integer >= 1. Got 0"),
    ({"prompt": 7}, 400, r"`prompt` must be a string or a non-empty list of strings. Got 7"),
    ({"prompt": []}, 400, r"non-empty list of strings"),
    ({"prompt": " the", "control": [1.0, 2.0]}, 400, r"`control` must be a list of 1 numbers"),
    ({"prompt": " the", "control": [1.0], "session": "x"}, 400, "send `control` or `session`, not both"),
    ({"prompt": " the", "temperature": 0.7}, 400, r":generate takes .*unknown \['temperature'\]"),
    ({"text": "a review"}, 400, r":generate takes"),
    ({"prompt": [" the"] * 9}, 400, r"`prompt` holds 9 texts, over the limit of 8 \(kbi serve --max-batch\)"),
    ({"prompt": " the", "session": "bad id!"}, 400, r"`session` must be 1 to 128 characters"),
    ({"prompt": [" the", ""]}, 400, r"a prompt is empty \(no tokens\)"),
])
def test_bad_generate_requests_get_a_clear_4xx_and_the_server_keeps_serving(llama, payload, status, message):
    import re

    _, server = llama
    got, body = call(server.port, "POST", "/v1/models/lm:generate", payload)
    assert got == status and re.search(message, body["error"]), body
    assert "Traceback" not in body["error"]
    assert call(server.port, "POST", "/v1/models/lm:generate", {"prompt": " the", "max_tokens": 2})[0] == 200


def test_classify_on_a_causal_lm_and_cross_origin_text_requests_are_refused(llama):
    _, server = llama
    status, body = call(server.port, "POST", "/v1/models/lm:classify", {"text": "great tea"})
    assert status == 400 and "needs a classifier exported with its preprocessor" in body["error"] and "is a causal_lm" in body["error"]
    headers = {"Host": f"127.0.0.1:{server.port}", "Origin": "http://evil.example", "Content-Type": "application/json"}
    status, body, _ = raw_call(server.port, "POST", "/v1/models/lm:generate", headers, b'{"prompt": " the"}')
    assert status == 403 and "Traceback" not in str(body)  # a web page cannot make this server generate


def test_classify_answers_what_the_keras_classifier_answers(tmp_path):
    clf = inject(load("minilm-l6", task="classifier", num_classes=2, sequence_length=32), rank=4)
    rng = np.random.default_rng(0)
    for v in clf.trainable_weights:
        v.assign(rng.normal(scale=0.05, size=v.shape).astype("float32"))
    export_saved_model(clf, tmp_path / "serving", "clf", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    server = Server(tmp_path / "serving" / "clf", tmp_path / "sessions.sqlite", name="clf")
    try:
        texts = ["This tea is wonderful, I buy it every month.", "Stale and bitter. Never again."]
        for control in (0.0, 1.0):
            status, body = call(server.port, "POST", "/v1/models/clf:classify", {"text": texts, "control": [control]})
            assert status == 200, body
            x = clf.preprocessor(texts)
            want = keras.ops.convert_to_numpy(keras.ops.softmax(clf({**x, "control": np.full((2, 1), control, "float32")})))
            np.testing.assert_allclose(body["probabilities"], want, rtol=1e-5, atol=1e-5)
            assert body["label"] == want.argmax(axis=-1).tolist()
        one = call(server.port, "POST", "/v1/models/clf:classify", {"text": texts[0]})[1]  # one string: one answer, neutral
        assert len(one["probabilities"]) == 2 and one["control"] == [0.0]
    finally:
        server.kill(signal.SIGTERM)
