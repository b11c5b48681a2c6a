"""`kbi serve` on loopback: TF Serving's REST API, sessions with decaying state, kill -9, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import DecayFeedback, inject
from keras_biasinject.export import export_saved_model
from tests.rewrite.tiny_models import BATCH, VOCAB, gpt2, out, tokens, train

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None, raw=None, timeout=60):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def oversized(port, path, length):
    """Announces a body over the limit and sends only its start, as a client would before a 413."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(length))
    connection.endheaders(b"x" * 1024)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


class Server:
    def __init__(self, export_dir, store, extra=()):
        self.export_dir, self.store, self.port, self.extra = export_dir, store, free_port(), list(extra)
        self.start()

    def start(self):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keras_biasinject.cli.main", "serve", str(self.export_dir), "--port", str(self.port),
             "--store", str(self.store), "--max-batch", "8", *self.extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.stderr.read().decode()[-3000:])
            try:
                if call(self.port, "GET", "/v1/models/lm", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def lm():
    model = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4)
    train(model, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 1)).astype("float32")})
    return model


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    export_saved_model(lm, base, "lm", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    srv = Server(base / "lm", base / "sessions.sqlite")
    yield srv
    srv.kill(signal.SIGTERM)


def rows(x, **extra):
    n = len(x["token_ids"])
    return [{**{k: np.asarray(v[i]).tolist() for k, v in x.items()}, **{k: np.asarray(v[i]).tolist() for k, v in extra.items()}} for i in range(n)]


def test_predict_sessions_decay_and_restart(server, lm):
    port = server.port
    status, body = call(port, "GET", "/v1/models/lm")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    status, meta = call(port, "GET", "/v1/models/lm/metadata")
    assert status == 200 and {"serve", "generate", "feedback_step"} <= set(meta["metadata"]["signature_def"])

    x = tokens()
    c = np.array([[1.5], [-0.5], [0.0]], "float32")
    expected = out(lm, {**x, "control": c})
    status, body = call(port, "POST", "/v1/models/lm:predict", {"instances": rows(x, control=c)})
    assert status == 200
    np.testing.assert_allclose(np.array(body["predictions"]), expected, rtol=1e-5, atol=1e-5)
    status, body = call(port, "POST", "/v1/models/lm:predict", {"inputs": {**{k: v.tolist() for k, v in x.items()}, "control": c.tolist()}})
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"]), expected, rtol=1e-5, atol=1e-5)

    # Feedback at t=1000, read back one half-life (10 s) later: the state has halved.
    status, body = call(port, "POST", "/v1/sessions/alice/feedback", {"rating": 1.0, "timestamp": 1000.0})
    assert status == 200 and body["state"] == [1.0] and body["updates"] == 1
    status, later = call(port, "GET", "/v1/sessions/alice?at=1010")
    assert status == 200
    np.testing.assert_allclose(later["state"], [0.5], rtol=1e-6)
    np.testing.assert_allclose(later["control"], [0.5], rtol=1e-6)
    status, far = call(port, "GET", "/v1/sessions/alice?at=1100")
    np.testing.assert_allclose(far["control"], [2.0 ** -10], rtol=1e-5)  # drifts back to neutral

    # A predict naming the session uses its control at the request's time.
    status, by_session = call(port, "POST", "/v1/models/lm:predict", {"instances": rows(x), "session": "alice", "timestamp": 1010.0})
    status2, by_value = call(port, "POST", "/v1/models/lm:predict", {"instances": rows(x, control=np.tile(later["control"], (BATCH, 1)))})
    assert status == status2 == 200 and by_session == by_value

    server.kill(signal.SIGTERM)  # restart: the state comes back from the store, decay from its timestamp
    server.start()
    assert call(port, "GET", "/v1/sessions/alice?at=1010")[1] == later


def test_eight_concurrent_clients_fifty_mixed_requests_each(server):
    errors = []
    x = tokens(batch=2)

    def client(k):
        for i in range(50):
            kind = i % 3
            if kind == 0:
                status, body = call(server.port, "POST", "/v1/models/lm:predict", {"instances": rows(x), "session": f"c{k}", "timestamp": 5000.0 + i})
            elif kind == 1:
                status, body = call(server.port, "POST", f"/v1/sessions/c{k}/feedback", {"rating": (-1.0) ** i, "timestamp": 5000.0 + i})
            else:
                status, body = call(server.port, "GET", f"/v1/sessions/c{k}?at={5000 + i}")
            if status != 200:
                errors.append((k, i, status, body))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k in range(8):
        assert call(server.port, "GET", f"/v1/sessions/c{k}?at=6000")[1]["updates"] == 17  # i = 1, 4, ..., 49


def test_acknowledged_feedback_survives_kill_9(server):
    acknowledged = []
    stop = threading.Event()

    def burst():
        while not stop.is_set():
            try:
                status, body = call(server.port, "POST", "/v1/sessions/burst/feedback", {"rating": 1.0, "timestamp": 7000.0}, timeout=10)
            except OSError:
                return  # the server is gone
            if status == 200:
                acknowledged.append(body["updates"])

    thread = threading.Thread(target=burst)
    thread.start()
    deadline = time.time() + 120
    while len(acknowledged) < 20 and time.time() < deadline:  # a busy machine may be slow to ack
        time.sleep(0.05)
    server.kill(signal.SIGKILL)  # mid-burst: the client is still writing
    stop.set()
    thread.join()
    assert len(acknowledged) > 10
    server.start()
    status, body = call(server.port, "GET", "/v1/sessions/burst?at=7000")
    assert status == 200
    # Every acknowledged update is there; at most the one in flight at the kill is there unacknowledged.
    assert len(acknowledged) <= body["updates"] <= len(acknowledged) + 1
    assert body["state"] == [float(body["updates"])]  # no torn state: one +1 per stored update


@pytest.mark.parametrize("method, path, payload, status, message", [
    ("POST", "/v1/models/lm:predict", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/models/lm:predict", {"instances": [{"token_ids": [1, 2], "padding_mask": [1], "control": [0.0]}]}, 400, "does not fit|disagree"),
    ("POST", "/v1/models/lm:predict", {"inputs": {"token_ids": [[1, 2]], "padding_mask": [[1, 1]], "control": [[float("nan")]]}}, 400, "NaN or infinite"),
    ("POST", "/v1/models/lm:predict", {"inputs": {"token_ids": [[1, 2]], "padding_mask": [[1, 1]]}}, 400, r"missing \['control'\]"),
    ("POST", "/v1/models/lm:predict", {"inputs": {"token_ids": [[1]] * 9, "padding_mask": [[1]] * 9, "control": [[0.0]] * 9}}, 400, "over the limit of 8"),
    ("POST", "/v1/models/lm:predict", {"instances": [], "signature_name": "serve"}, 400, "non-empty list"),
    ("POST", "/v1/models/lm:predict", {"inputs": {"token_ids": [[1, 2]], "padding_mask": [[1, 1]], "control": [[0.0]]}, "signature_name": "nope"}, 400, "unknown signature_name"),
    ("POST", "/v1/models/other:predict", {"instances": [1]}, 404, "no model 'other' here"),
    ("GET", "/v1/sessions/nobody", None, 404, "no session 'nobody'"),
    ("GET", "/v1/sessions/alice?at=abc", None, 400, "`at` must be a finite number"),
    ("POST", "/v1/sessions/s1/feedback", {"feedback": [1.0, 2.0]}, 400, "list of 1 numbers"),
    ("POST", "/v1/sessions/s1/feedback", {"rating": "high"}, 400, "`rating` must be a finite number"),
    ("POST", "/v1/sessions/s1/feedback", b"x" * (2 << 20), 413, "request body over"),
])
def test_bad_requests_get_a_clear_4xx(server, method, path, payload, status, message):
    import re

    raw = payload if isinstance(payload, bytes) else None
    if raw is not None and len(raw) > (1 << 20):
        got, body = oversized(server.port, path, len(raw))
    else:
        got, body = call(server.port, method, path, body=None if raw else payload, raw=raw)
    assert got == status and re.search(message, body["error"]), body
    assert call(server.port, "GET", "/v1/models/lm")[0] == 200  # still serving


@pytest.fixture(scope="module")
def tuning_server(lm, tmp_path_factory):
    base = tmp_path_factory.mktemp("tuning")
    lm.save(base / "lm.keras")
    export_saved_model(lm, base, "lm", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    srv = Server(base / "lm", base / "sessions.sqlite", extra=["--source", str(base / "lm.keras")])
    yield srv, base
    srv.kill(signal.SIGTERM)


def test_adapt_publishes_only_when_heldout_loss_holds(tuning_server):
    srv, base = tuning_server
    x = tokens()
    c = np.ones((BATCH, 1), "float32")
    data = {**{k: v.tolist() for k, v in x.items()}, "control": c.tolist(), "labels": x["token_ids"].tolist()}
    neutral = {"inputs": {**{k: v.tolist() for k, v in x.items()}, "control": np.zeros((BATCH, 1)).tolist()}}
    steered = {"inputs": {**{k: v.tolist() for k, v in x.items()}, "control": c.tolist()}}
    _, neutral_v1 = call(srv.port, "POST", "/v1/models/lm:predict", neutral)
    _, steered_v1 = call(srv.port, "POST", "/v1/models/lm:predict", steered)

    status, body = call(srv.port, "POST", "/v1/models/lm:adapt", {"examples": data, "heldout": data, "steps": 5, "learning_rate": 1e-2}, timeout=300)
    assert status == 200 and body["accepted"] and body["version"] == 2, body
    assert body["loss_after"] < body["loss_before"]
    assert (base / "lm" / "2" / "saved_model.pb").is_file()
    assert call(srv.port, "GET", "/v1/models/lm")[1]["model_version_status"][0]["version"] == "2"
    _, neutral_v2 = call(srv.port, "POST", "/v1/models/lm:predict", neutral)
    _, steered_v2 = call(srv.port, "POST", "/v1/models/lm:predict", steered)
    assert neutral_v2 == neutral_v1  # the base never changes: the neutral control is still the base, exactly
    assert steered_v2 != steered_v1

    # Training on scrambled labels at a huge learning rate makes the held-out loss worse: rolled back.
    noise = {**data, "labels": np.random.default_rng(5).integers(1, VOCAB, x["token_ids"].shape).tolist()}
    status, body = call(srv.port, "POST", "/v1/models/lm:adapt", {"examples": noise, "steps": 20, "learning_rate": 1.0}, timeout=300)
    assert status == 409 and "rolled back: held-out loss rose" in body["error"], body
    assert not (base / "lm" / "3").exists()
    assert call(srv.port, "POST", "/v1/models/lm:predict", steered)[1] == steered_v2  # still version 2's answers
    (base / "noise.json").write_text(json.dumps(noise))
    result = subprocess.run([sys.executable, "-m", "keras_biasinject.cli.main", "adapt", f"http://127.0.0.1:{srv.port}", "--name", "lm",
                             "--examples", str(base / "noise.json"), "--steps", "20", "--learning-rate", "1.0"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2 and "rolled back" in result.stderr  # kbi adapt says why
    status, body = call(srv.port, "POST", "/v1/models/lm:adapt", {"examples": data, "steps": 1000})
    assert status == 400 and "`steps` must be an integer from 1 to 100" in body["error"]
    status, body = call(srv.port, "POST", "/v1/models/lm:adapt", {"examples": {"token_ids": [[1]]}})
    assert status == 400 and "plus `labels`" in body["error"]
