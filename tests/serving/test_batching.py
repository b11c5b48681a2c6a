"""Dynamic batching (`kbi serve --batching`): concurrent requests with different controls share one
signature call and get the answers they would get alone; a request the model refuses fails alone."""

import signal

import keras_hub
import numpy as np
import pytest

from keras_biasinject import DecayFeedback, inject
from keras_biasinject.serving.app import BadRequest, SessionServer
from keras_biasinject.serving.batching import Batcher
from keras_biasinject.serving.models import LoadedExport
from keras_biasinject.export import export_saved_model
from tests.rewrite.tiny_models import BATCH, VOCAB, gpt2, tokens, train
from tests.serving.concurrency import in_threads
from tests.serving.test_server import Server, call

pytestmark = pytest.mark.slow
CLIENTS = 16


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4)
    train(lm, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 1)).astype("float32")})
    lm.compile(sampler="greedy")
    base = tmp_path_factory.mktemp("batching")
    export_saved_model(lm, base, "lm", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    return base / "lm"


def request(k, length=8):
    """Client k's one-row request: its own tokens and its own control."""
    x = tokens(seed=k, batch=1)
    return {"token_ids": x["token_ids"][:, :length], "padding_mask": x["padding_mask"][:, :length],
            "control": np.array([[np.linspace(-2, 2, CLIENTS)[k]]], "float32")}


def concurrently(fn, n=CLIENTS):
    return in_threads(fn, n)


@pytest.mark.parametrize("signature", ["serve", "generate"])
def test_gathered_rows_answer_as_they_would_alone(export, signature):
    loaded = LoadedExport(export)
    alone = [SessionServer.run_signature(loaded, signature, request(k)) for k in range(CLIENTS)]
    batcher = Batcher(SessionServer.run_signature, max_size=CLIENTS, max_wait_s=0.5)
    results, errors = concurrently(lambda k: batcher.call(loaded, signature, request(k)))
    assert errors == [None] * CLIENTS
    assert batcher.batches <= 4  # 16 requests, gathered (one call when they all arrive within the wait)
    for got, want in zip(results, alone):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert any(not np.array_equal(results[0][k], results[-1][k]) for k in results[0])  # the controls differ, so do answers


def test_only_requests_of_one_shape_share_a_call_and_a_refused_one_fails_alone(export):
    loaded = LoadedExport(export)
    batcher = Batcher(SessionServer.run_signature, max_size=CLIENTS, max_wait_s=0.5)

    def one(k):
        x = request(k, length=8 if k % 2 else 6)  # two sequence lengths: two batches
        if k == 3:
            x["token_ids"] = np.full_like(x["token_ids"], 10 * VOCAB)  # past the embedding: the model refuses it
        return batcher.call(loaded, "serve", x)

    results, errors = concurrently(one)
    assert isinstance(errors[3], BadRequest) and "the model refused the inputs" in str(errors[3])
    assert [k for k, e in enumerate(errors) if e is not None] == [3]
    for k in (1, 2, 5):
        want = SessionServer.run_signature(loaded, "serve", request(k, length=8 if k % 2 else 6))
        np.testing.assert_allclose(results[k]["logits"], want["logits"], rtol=1e-5, atol=1e-5)


def test_batching_flags_are_checked():
    with pytest.raises(ValueError, match=r"--batch-max-size must be an integer >= 1. Got 0"):
        Batcher(SessionServer.run_signature, max_size=0)
    with pytest.raises(ValueError, match=r"--batch-wait-ms must be a number of milliseconds from 0 to 10000. Got -1000"):
        Batcher(SessionServer.run_signature, max_wait_s=-1.0)


def test_a_batching_server_answers_sixteen_clients_with_their_own_controls_and_sessions(export, tmp_path):
    server = Server(export, tmp_path / "sessions.sqlite", extra=["--batching", "--batch-max-size", "16", "--batch-wait-ms", "20"])
    try:
        loaded = LoadedExport(export)
        assert call(server.port, "POST", "/v1/sessions/s5/feedback", {"rating": 0.5, "timestamp": 100.0})[0] == 200

        def one(k):
            x = request(k)
            body = {"inputs": {name: v.tolist() for name, v in x.items()}}
            if k == 5:  # a session's control instead of its own
                del body["inputs"]["control"]
                body.update(session="s5", timestamp=100.0)
            status, answer = call(server.port, "POST", "/v1/models/lm:predict", {**body, "signature_name": "generate"})
            assert status == 200, answer
            return answer["outputs"]

        results, errors = concurrently(one)
        assert errors == [None] * CLIENTS
        for k, got in enumerate(results):
            x = request(k)
            if k == 5:
                x["control"] = np.array([[0.5]], "float32")  # the session's state right after its feedback
            want = SessionServer.run_signature(loaded, "generate", x)
            assert got["token_ids"] == want["token_ids"].tolist()
    finally:
        server.kill(signal.SIGTERM)
