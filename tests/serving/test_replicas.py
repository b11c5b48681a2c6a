"""Two `kbi serve` replicas on 127.0.0.1 sharing one PostgreSQL database (a private server these
tests start): shared sessions, `kill -9` of a replica, a database restart, and a database that is
down or misnamed at start."""

import signal
import subprocess
import sys
import threading
import time

import keras_hub
import numpy as np
import pytest

from keras_biasinject import DecayFeedback, inject
from keras_biasinject.export import export_saved_model
from tests.rewrite.tiny_models import BATCH, gpt2, tokens, train
from tests.serving.concurrency import in_threads
from tests.serving.postgres import PostgresServer, free_port
from tests.serving.test_server import Server, call, rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4)
    train(lm, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 1)).astype("float32")})
    base = tmp_path_factory.mktemp("replicas")
    export_saved_model(lm, base, "lm", feedback=DecayFeedback(control_dim=1, half_life=10.0))
    return base / "lm"


@pytest.fixture(scope="module")
def replicas(pg, export):
    pair = [Server(export, pg.url), Server(export, pg.url)]
    yield pair
    for server in pair:
        if server.process.poll() is None:
            server.kill(signal.SIGTERM)


def feedback(server, session, timeout=10):
    return call(server.port, "POST", f"/v1/sessions/{session}/feedback", {"rating": 1.0, "timestamp": 7000.0}, timeout=timeout)


def test_eight_clients_through_two_replicas_lose_and_double_nothing(replicas):
    acknowledged = {f"shared{j}": 0 for j in range(4)}
    lock = threading.Lock()
    errors = []

    def client(k):
        for i in range(20):
            session = f"shared{(k + i) % 4}"
            status, body = feedback(replicas[(k + i) % 2], session, timeout=60)
            if status != 200:
                errors.append((k, i, status, body))
                continue
            assert body["state"] == [float(body["updates"])]  # rating 1 at one timestamp: +1 per stored update
            with lock:
                acknowledged[session] += 1

    assert in_threads(client, 8)[1] == [None] * 8
    assert errors == []
    assert sum(acknowledged.values()) == 160
    for session, count in acknowledged.items():
        for server in replicas:  # both replicas see every update, once
            status, body = call(server.port, "GET", f"/v1/sessions/{session}?at=7000")
            assert status == 200 and body["updates"] == count and body["state"] == [float(count)]


def test_kill_9_of_one_replica_loses_nothing_and_the_other_keeps_answering(replicas):
    doomed, survivor = replicas
    acks = {"doomed": [], "survivor": []}
    stop = threading.Event()

    def burst(server, name):
        while not stop.is_set():
            try:
                status, body = feedback(server, "burst")
            except OSError:
                return  # this replica is gone
            if status == 200:
                acks[name].append(time.time())

    threads = [threading.Thread(target=burst, args=(s, n)) for s, n in ((doomed, "doomed"), (doomed, "doomed"),
                                                                         (survivor, "survivor"), (survivor, "survivor"))]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acks["doomed"]) < 20 and time.time() < deadline:
        time.sleep(0.05)
    killed_at = time.time()
    doomed.kill(signal.SIGKILL)  # mid-burst: two clients are still writing through it
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert len(acks["doomed"]) >= 20
    assert sum(t > killed_at for t in acks["survivor"]) >= 3  # the survivor answered while the other was down
    acknowledged = len(acks["doomed"]) + len(acks["survivor"])
    status, body = call(survivor.port, "GET", "/v1/sessions/burst?at=7000")
    assert status == 200
    # Every acknowledged update is there; at most the two in flight through the killed replica are there unacknowledged.
    assert acknowledged <= body["updates"] <= acknowledged + 2
    assert body["state"] == [float(body["updates"])]  # no torn state
    doomed.start()  # back: it reads the same row
    assert call(doomed.port, "GET", "/v1/sessions/burst?at=7000")[1] == body


def test_a_database_restart_answers_503_then_recovers_with_every_update(replicas, pg):
    server = replicas[1]
    for _ in range(3):
        assert feedback(server, "restart")[0] == 200
    pg.stop("fast")
    try:
        status, body, headers = call(server.port, "POST", "/v1/sessions/restart/feedback", {"rating": 1.0, "timestamp": 7000.0},
                                     with_headers=True)
        assert status == 503 and "session store is unavailable; nothing was stored" in body["error"]
        assert headers["Retry-After"] == "2" and "Traceback" not in body["error"]
        assert call(server.port, "GET", "/v1/sessions/restart?at=7000")[0] == 503
        x = tokens()  # a predict with its own control needs no store: still answered
        status, _ = call(server.port, "POST", "/v1/models/lm:predict", {"instances": rows(x, control=np.zeros((BATCH, 1), "float32"))})
        assert status == 200
    finally:
        pg.start()
    status, body = feedback(server, "restart")
    assert status == 200 and body["updates"] == 4  # the three acknowledged, and this one
    assert call(replicas[0].port, "GET", "/v1/sessions/restart?at=7000")[1]["updates"] == 4


@pytest.mark.parametrize("store, message", [
    ("postgresql://kbi:hunter2@127.0.0.1:{closed}/postgres", r"session store 'postgresql://kbi:\*\*\*@127.0.0.1:\d+/postgres' cannot be opened"),
    ("postgresql://kbi@127.0.0.1:port/postgres", r"is not a valid PostgreSQL URL"),
    ("redis://127.0.0.1:6379", r"unknown store scheme 'redis'"),
])
def test_a_store_that_cannot_be_used_stops_the_server_with_a_clear_error(export, store, message):
    result = subprocess.run([sys.executable, "-m", "keras_biasinject.cli.main", "serve", str(export), "--port", str(free_port()),
                             "--store", store.format(closed=free_port())], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert __import__("re").search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout
