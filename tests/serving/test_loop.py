"""The serving loop (`"loop": "self"`, `kbi serve --loop self`): a predict moves its session by
`feedback_step` of the model's own reading, in one committed update; targets, ratings, NaN
readings, bad input, concurrent updates and kill -9."""

import http.client
import json
import math
import signal
import subprocess
import sys
import threading
import time

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject import DecayFeedback, FeedbackHead, add_feedback_head, inject, remove_feedback_head
from keras_biasinject.cli.main import main
from keras_biasinject.export import export_saved_model
from keras_biasinject.serving.app import BadRequest, Limits, LoopSettings, PredictJSON, SessionServer
from keras_biasinject.serving.models import LoadedExport
from keras_biasinject.serving.store import SQLiteStore
from tests.rewrite.tiny_models import BATCH, gpt2, tokens, train
from tests.serving.test_server import Server, call, free_port, rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    model = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4)  # control_dim 1
    train(model, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 1)).astype("float32")})
    keras.utils.set_random_seed(1)
    add_feedback_head(model, FeedbackHead(1))  # sigmoid: readings in (0, 1)
    return model


@pytest.fixture(scope="module")
def exports(lm, tmp_path_factory):
    """{name: LoadedExport}: "lm" (a head and sessions) and one export per way a loop cannot run."""
    base = tmp_path_factory.mktemp("loop")
    feedback = DecayFeedback(control_dim=1, half_life=10.0)
    export_saved_model(lm, base, "lm", feedback=feedback)
    export_saved_model(lm, base, "nosessions")  # a head, no feedback_step
    # (A feedback_step wider than the head is refused by export_saved_model itself since issue 17.)
    head = remove_feedback_head(lm)
    export_saved_model(lm, base, "headless", feedback=feedback)
    add_feedback_head(lm, head)
    bias = keras.ops.convert_to_numpy(head.bias)
    head.bias.assign([float("nan")])  # a broken head: NaN readings, the model's own outputs untouched
    export_saved_model(lm, base, "nan", feedback=feedback)
    head.bias.assign(bias)
    return {name: LoadedExport(base / name) for name in ("lm", "nosessions", "headless", "nan")}


@pytest.fixture(scope="module")
def step(exports):
    """The "lm" export's `feedback_step`, loaded on its own: (state, feedback, elapsed) -> (new_state, control)."""
    fn = tf.saved_model.load(str(exports["lm"].path)).signatures["feedback_step"]

    def feedback_step(state, feedback, elapsed):
        result = fn(state=tf.constant([state], tf.float32), feedback=tf.constant([feedback], tf.float32),
                    elapsed=tf.constant([elapsed], tf.float32))
        return result["new_state"].numpy()[0].tolist(), result["control"].numpy()[0].tolist()

    return feedback_step


def session_server(export, tmp_path, loop=None, token=None):
    """A `SessionServer` whose clock reads 10,000 s (timestamps up to 10,300 are accepted)."""
    return SessionServer(export, SQLiteStore(tmp_path / "sessions.sqlite"), Limits(max_batch=8), lambda: 1e4, loop=loop, token=token)


def padded_tokens():
    x = tokens(seed=2)
    x["padding_mask"][1, 6:] = 0  # one padded row: the head pools over real tokens only
    return x


def test_a_loop_request_moves_its_session_by_feedback_step_of_its_own_reading(lm, exports, step, tmp_path):
    srv = session_server(exports["lm"], tmp_path)
    x = padded_tokens()
    body = {"instances": rows(x), "session": "s", "loop": "self", "timestamp": 1000.0}
    answer = srv.predict("lm", body)
    loop = answer["loop"]
    assert loop["control_used"] == [0.0]  # a new session starts at the neutral control
    readings = np.array([p["feedback"] for p in answer["predictions"]], "float32")  # (B, 1): each row's pooled reading
    np.testing.assert_allclose(readings, lm.read_feedback(x, control=np.zeros((BATCH, 1), "float32")), rtol=0, atol=1e-6)
    assert loop["reading"] == np.mean(readings, axis=0, dtype=np.float32).tolist()  # the mean over the rows
    assert loop["feedback"] == loop["reading"] and loop["target"] is None  # no target: the reading is the feedback
    assert loop["updated"] and loop["skipped"] is None and loop["updates"] == 1 and loop["updated_at"] == 1000.0
    assert (loop["state"], loop["control"]) == step([0.0], loop["reading"], 0.0)
    assert loop["state"] == [float(np.float32(loop["reading"][0]))]  # by hand: 0 + r G, G = 1
    assert srv.show("s", 1000.0)["state"] == loop["state"]  # committed
    # The answer is what `serve` gives at that control.
    same = srv.predict("lm", {"instances": rows(x, control=np.zeros((BATCH, 1), "float32"))})
    assert same["predictions"] == answer["predictions"] and "loop" not in same

    # One half-life later the request runs at the decayed control, and the state moves by feedback_step again.
    later = srv.predict("lm", {**body, "timestamp": 1010.0})["loop"]
    assert later["control_used"] == step(loop["state"], [0.0], 10.0)[1]
    np.testing.assert_allclose(later["control_used"], 0.5 * np.array(loop["state"]), rtol=1e-6)
    used = np.tile(np.array(later["control_used"], "float32"), (BATCH, 1))
    np.testing.assert_allclose(later["reading"], lm.read_feedback(x, control=used).mean(axis=0), rtol=0, atol=1e-6)
    assert later["state"] == step(loop["state"], later["reading"], 10.0)[0] and later["updates"] == 2
    np.testing.assert_allclose(later["state"], 0.5 * np.array(loop["state"]) + later["reading"], rtol=1e-6)  # by hand

    # `generate`: the reading of what was generated.
    prompt = tokens(batch=2)
    prompt["padding_mask"][:, 3:] = 0
    gen = srv.predict("lm", {"signature_name": "generate", "inputs": {k: v.tolist() for k, v in prompt.items()},
                             "session": "s", "loop": "self", "timestamp": 1010.0})
    control = np.tile(np.array(gen["loop"]["control_used"], "float32"), (2, 1))
    generated, reading = lm.generate(dict(prompt), stop_token_ids=None, control=control, return_feedback=True)
    assert gen["outputs"]["token_ids"] == keras.ops.convert_to_numpy(generated["token_ids"]).tolist()
    np.testing.assert_allclose(gen["loop"]["reading"], reading.mean(axis=0), rtol=0, atol=1e-6)
    assert gen["loop"]["state"] == step(later["state"], gen["loop"]["reading"], 0.0)[0] and gen["loop"]["updates"] == 3


def test_a_target_feeds_back_target_minus_reading(exports, step, tmp_path):
    srv = session_server(exports["lm"], tmp_path, LoopSettings("self", 0.25))  # kbi serve --loop self --loop-target 0.25
    x = padded_tokens()
    loop = srv.predict("lm", {"instances": rows(x), "session": "t", "timestamp": 0.0})["loop"]  # the server's defaults
    assert loop["target"] == [0.25]
    assert loop["feedback"] == [float(np.float32(0.25) - np.float32(loop["reading"][0]))]
    assert loop["state"] == step([0.0], loop["feedback"], 0.0)[0]
    mine = srv.predict("lm", {"instances": rows(x), "session": "t", "timestamp": 0.0, "target": [0.9]})["loop"]  # the request's wins
    assert mine["target"] == [0.9] and mine["feedback"] == [float(np.float32(0.9) - np.float32(mine["reading"][0]))]
    assert mine["state"] == step(loop["state"], mine["feedback"], 0.0)[0] and mine["updates"] == 2
    off = srv.predict("lm", {"instances": rows(x), "session": "t", "timestamp": 0.0, "loop": "off"})
    assert "loop" not in off and srv.store.get("t")[2] == 2  # "off": reads the session, leaves it
    plain = srv.predict("lm", {"instances": rows(x, control=np.zeros((BATCH, 1)))})
    assert "loop" not in plain and srv.store.get("t")[2] == 2  # no session: the default loop has nothing to update


def test_external_ratings_add_to_the_loop(exports, step, tmp_path):
    srv = session_server(exports["lm"], tmp_path)
    srv.feedback("r", {"rating": 1.0, "timestamp": 2000.0})
    loop = srv.predict("lm", {"instances": rows(padded_tokens()), "session": "r", "loop": "self", "timestamp": 2005.0})["loop"]
    assert loop["control_used"] == step([1.0], [0.0], 5.0)[1]  # the rating, decayed for 5 s
    assert loop["state"] == step([1.0], loop["reading"], 5.0)[0] and loop["updates"] == 2
    after = srv.feedback("r", {"rating": -1.0, "timestamp": 2006.0})
    assert after["state"] == step(loop["state"], [-1.0], 1.0)[0] and after["updates"] == 3


def test_a_nan_reading_answers_and_leaves_the_session_as_it_was(exports, step, tmp_path):
    srv = session_server(exports["nan"], tmp_path)
    srv.feedback("n", {"rating": 1.0, "timestamp": 0.0})
    before = srv.store.get("n")
    x = padded_tokens()
    answer = srv.predict("nan", {"instances": rows(x), "session": "n", "loop": "self", "timestamp": 5.0})
    loop = answer["loop"]
    assert not loop["updated"] and loop["feedback"] is None and "is not finite, so the session was not updated" in loop["skipped"]
    assert math.isnan(loop["reading"][0]) and all(math.isnan(p["feedback"][0]) for p in answer["predictions"])
    assert srv.store.get("n") == before and loop["updates"] == 1
    assert (loop["state"], loop["control"]) == step([1.0], [0.0], 5.0)  # the session as it stands at the request's time
    # The model's own outputs are those of the sound export at the same control.
    sound = session_server(exports["lm"], tmp_path).predict("lm", {"instances": rows(x, control=np.tile(loop["control_used"], (BATCH, 1)))})
    assert [p["logits"] for p in answer["predictions"]] == [p["logits"] for p in sound["predictions"]]
    assert math.isnan(json.loads(PredictJSON(answer).body)["loop"]["reading"][0])  # NaN as TF Serving writes it, not a 500
    srv.predict("nan", {"instances": rows(x), "session": "new", "loop": "self", "timestamp": 5.0})
    assert srv.store.get("new") is None  # not even created


@pytest.mark.parametrize("export, extra, message", [
    ("headless", {"loop": "self"}, "this export has no feedback head, so the model gives no reading.*\"loop\": \"off\""),
    ("lm", {"loop": "self", "session": None}, "updates a session from the model's reading: name it"),
    ("lm", {"loop": "self", "target": 1.5}, r"`target` \[1.5\] lies outside the feedback head's reading range \(0.0, 1.0\)"),
    ("lm", {"loop": "self", "target": 0.0}, r"`target` \[0.0\] lies outside"),  # open: a sigmoid never reads 0
    ("lm", {"loop": "self", "target": [0.5, 0.5]}, r"`target` must be a number or a list of 1 number\(s\).*Got \[0.5, 0.5\]"),
    ("lm", {"loop": "self", "target": "high"}, "`target` must be a finite number. Got 'high'"),
    ("lm", {"loop": "yes"}, r"`loop` must be one of \['off', 'self'\].*Got loop='yes'"),
    ("nosessions", {"loop": "self"}, "no feedback_step signature, so it keeps no sessions.*--feedback-half-life"),
    ("lm", {"loop": "self", "control": True}, "runs with its session's control: leave `control` out"),
    ("lm", {"target": 0.5}, "`target` steers the serving loop"),  # the loop is off
    ("lm", {"loop": "self", "timestamp": -1.0}, "timestamp -1.0 is before session 'bad'"),
])
def test_bad_loop_requests_get_a_clear_400_and_change_nothing(exports, tmp_path, export, extra, message):
    srv = session_server(exports[export], tmp_path)
    srv.store.update("bad", lambda current: ([0.5], 0.0), 10)  # a session with a state to keep
    own_control = {"control": np.zeros((BATCH, 1))} if extra.get("control") else {}
    body = {"instances": rows(padded_tokens(), **own_control), "session": "bad", "timestamp": 1.0, **extra}
    body = {k: v for k, v in body.items() if v is not None and k != "control"}  # "session": None: no session
    with pytest.raises(BadRequest, match=message) as error:
        srv.predict(export, body)
    assert error.value.status == 400
    assert srv.store.get("bad") == ([0.5], 0.0, 1)


def test_the_server_refuses_a_loop_it_cannot_run_at_start(exports, tmp_path, capsys):
    with pytest.raises(ValueError, match="serve --loop self: this export has no feedback head"):
        session_server(exports["headless"], tmp_path, LoopSettings("self"))
    with pytest.raises(ValueError, match=r"--loop-target \[2.0\] lies outside the feedback head's reading range"):
        session_server(exports["lm"], tmp_path, LoopSettings("self", 2.0))
    with pytest.raises(ValueError, match=r"`loop` must be one of \['off', 'self'\]. Got loop='on'"):
        LoopSettings("on")
    assert main(["serve", str(exports["lm"].path.parent), "--loop", "self", "--loop-target", "high"]) == 2
    assert "--loop-target takes numbers" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "keras_biasinject.cli.main", "serve", str(exports["headless"].path.parent),
                             "--loop", "self", "--store", str(tmp_path / "s.sqlite"), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "kbi serve: error: serve --loop self: this export has no feedback head" in result.stderr


def test_concurrent_loop_requests_and_ratings_each_build_on_the_last_update(exports, step, tmp_path):
    srv = session_server(exports["lm"], tmp_path)
    x = tokens(batch=2)
    acks, errors = [], []

    def looper():
        for _ in range(6):
            try:
                acks.append(srv.predict("lm", {"instances": rows(x), "session": "c", "loop": "self", "timestamp": 0.0})["loop"])
            except BadRequest as error:
                errors.append(str(error))

    def rater():
        for i in range(8):
            acks.append({**srv.feedback("c", {"rating": (-1.0) ** i, "timestamp": 0.0}), "feedback": [(-1.0) ** i]})
            time.sleep(0.01)

    threads = [threading.Thread(target=looper) for _ in range(3)] + [threading.Thread(target=rater)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    acks.sort(key=lambda a: a["updates"])
    assert [a["updates"] for a in acks] == list(range(1, 27))  # every update stored, none lost or doubled
    state = [0.0]
    for ack in acks:  # each update applied to the state the one before it left, a loop's at that state's control
        if "control_used" in ack:
            assert ack["control_used"] == step(state, [0.0], 0.0)[1]
        state = step(state, ack["feedback"], 0.0)[0]
        assert ack["state"] == state


def test_every_acknowledged_loop_update_survives_kill_9(exports, step, tmp_path):
    server = Server(exports["lm"].path.parent, tmp_path / "sessions.sqlite", extra=["--loop", "self"])
    try:
        kill_mid_burst_and_restart(server, step)
    finally:
        if server.process.poll() is None:
            server.kill(signal.SIGTERM)


def kill_mid_burst_and_restart(server, step):
    x = tokens(batch=2)
    status, body = call(server.port, "POST", "/v1/models/lm:predict", {"instances": rows(x), "session": "burst", "loop": "maybe"})
    assert status == 400 and "`loop` must be one of" in body["error"]
    acknowledged = []
    stop = threading.Event()

    def burst():
        while not stop.is_set():
            try:  # no "loop" in the body: the server's --loop self applies
                status, body = call(server.port, "POST", "/v1/models/lm:predict",
                                    {"instances": rows(x), "session": "burst", "timestamp": 7000.0}, timeout=10)
            except (OSError, http.client.HTTPException):  # the server is gone, maybe mid-answer: not acknowledged
                return
            if status == 200:
                acknowledged.append(body["loop"])

    thread = threading.Thread(target=burst)
    thread.start()
    deadline = time.time() + 120
    while len(acknowledged) < 20 and time.time() < deadline:
        time.sleep(0.05)
    server.kill(signal.SIGKILL)  # mid-burst
    stop.set()
    thread.join()
    assert len(acknowledged) > 10
    state = [0.0]
    for i, loop in enumerate(acknowledged):  # one update per answer, each on the one before
        assert loop["updates"] == i + 1 and loop["state"] == step(state, loop["feedback"], 0.0)[0]
        state = loop["state"]
    server.start()
    status, stored = call(server.port, "GET", "/v1/sessions/burst?at=7000")
    assert status == 200
    # Every acknowledged update is there; at most the one in flight at the kill is there unacknowledged.
    assert len(acknowledged) <= stored["updates"] <= len(acknowledged) + 1
    if stored["updates"] == len(acknowledged):
        assert stored["state"] == state
    status, body = call(server.port, "POST", "/v1/models/lm:predict", {"instances": rows(x), "session": "burst", "timestamp": 7000.0})
    assert status == 200 and body["loop"]["updates"] == stored["updates"] + 1
    assert body["loop"]["state"] == step(stored["state"], body["loop"]["feedback"], 0.0)[0]


# Issue 17: sessions never hold non-finite values, client clocks are bounded, state changes need the token.

def test_feedback_that_would_overflow_float32_is_refused_and_stores_nothing(exports, tmp_path):
    srv = session_server(exports["lm"], tmp_path)
    with pytest.raises(BadRequest, match=r"`rating` must be a finite number within \+-3.40282e\+38"):
        srv.feedback("big", {"rating": 3.5e38, "timestamp": 0.0})
    assert srv.feedback("big", {"rating": 2e38, "timestamp": 0.0})["state"] == [float(np.float32(2e38))]
    with pytest.raises(BadRequest, match=r"would take session 'big' to a non-finite state \[inf\].*nothing was stored"):
        srv.feedback("big", {"rating": 2e38, "timestamp": 0.0})
    assert srv.store.get("big") == ([float(np.float32(2e38))], 0.0, 1)  # as before the refused update
    assert srv.show("big", 0.0)["state"] == [float(np.float32(2e38))]  # still readable


def test_a_session_stored_non_finite_by_an_older_version_is_a_409_until_reset(exports, tmp_path):
    srv = session_server(exports["lm"], tmp_path)
    srv.store.update("old", lambda current: ([math.inf], 0.0), 10)  # what the old server committed
    x = rows(padded_tokens())
    for attempt in (lambda: srv.show("old", 1.0), lambda: srv.feedback("old", {"rating": 1.0, "timestamp": 1.0}),
                    lambda: srv.predict("lm", {"instances": x, "session": "old", "timestamp": 1.0}),
                    lambda: srv.predict("lm", {"instances": x, "session": "old", "timestamp": 1.0, "loop": "self"})):
        with pytest.raises(BadRequest, match=r"session 'old' holds a non-finite state \[inf\].*\"reset\": true") as error:
            attempt()
        assert error.value.status == 409
    assert srv.feedback("old", {"rating": 1.0, "timestamp": 2.0, "reset": True})["state"] == [1.0]
    assert srv.show("old", 2.0)["updates"] == 2


@pytest.mark.parametrize("route, body, message", [
    ("feedback", {"rating": 1.0, "timestamp": 1e15}, r"`timestamp` 1000000000000000.0 lies more than 300.0 s ahead of the server.s clock"),
    ("feedback", {"rating": 1.0, "timestamp": 10 ** 400}, r"`timestamp` must be a finite number. Got 1000"),
    ("feedback", {"rating": 10 ** 400}, r"`rating` must be a finite number within"),
    ("feedback", {"rating": 1.0, "reset": "yes"}, r"`reset` must be true or false"),
    ("loop", {"timestamp": 1e15}, r"`timestamp` 1000000000000000.0 lies more than 300.0 s ahead"),
    ("predict", {"session": "x" * 60_000}, r"`session` must be 1 to 128 characters"),
    ("predict", {"session": 5}, r"`session` must be 1 to 128 characters.*Got 5"),
    ("predict", {"signature_name": ["serve"]}, r"`signature_name` must be a string. Got \['serve'\]"),
    ("predict", {"instances": [{"token_ids": [-1] * 8, "padding_mask": [1] * 8, "control": [0.0]}]}, r"'token_ids': -1 is out of range"),
    ("predict", {"instances": [{"token_ids": [1.5] * 8, "padding_mask": [1] * 8, "control": [0.0]}]}, r"'token_ids': values must be integers"),
    ("predict", {"instances": [{"token_ids": [2 ** 40] * 8, "padding_mask": [1] * 8, "control": [0.0]}]}, r"'token_ids': 1099511627776 is out"),
])
def test_bad_session_and_predict_values_are_a_400_and_change_nothing(exports, tmp_path, route, body, message):
    srv = session_server(exports["lm"], tmp_path)
    srv.store.update("s", lambda current: ([0.5], 0.0), 10)
    with pytest.raises(BadRequest, match=message) as error:
        if route == "feedback":
            srv.feedback("s", body)
        else:
            base = {"instances": rows(padded_tokens()), "session": "s", "timestamp": 1.0, **({"loop": "self"} if route == "loop" else {})}
            srv.predict("lm", {**base, **body})
    assert error.value.status == 400
    assert srv.store.get("s") == ([0.5], 0.0, 1)
    assert srv.feedback("s", {"rating": 1.0})["updated_at"] == 1e4  # no timestamp: the server's clock


def test_with_a_token_state_changes_need_it_and_reads_do_not(exports, tmp_path):
    srv = session_server(exports["lm"], tmp_path, token="s3cret")
    x = rows(padded_tokens())
    for authorization in (None, "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(BadRequest, match=r"session feedback changes state.*Authorization: Bearer") as error:
            srv.feedback("t", {"rating": 1.0, "timestamp": 0.0}, authorization)
        assert error.value.status == 401
        with pytest.raises(BadRequest, match=r"a predict that updates its session") as error:
            srv.predict("lm", {"instances": x, "session": "t", "loop": "self", "timestamp": 0.0}, authorization)
        assert error.value.status == 401
    assert srv.store.get("t") is None
    assert srv.feedback("t", {"rating": 1.0, "timestamp": 0.0}, "Bearer s3cret")["updates"] == 1
    assert srv.predict("lm", {"instances": x, "session": "t", "loop": "self", "timestamp": 0.0}, "bearer s3cret")["loop"]["updates"] == 2
    assert "predictions" in srv.predict("lm", {"instances": x, "session": "t", "timestamp": 0.0})  # reads stay open
    assert srv.show("t", 0.0)["updates"] == 2


def test_sessions_expire_by_the_servers_clock(exports, tmp_path):
    """Review of issue 17: `create_app`'s clock is the store's too (before: the store stamped and expired
    sessions by the real time while requests used the given clock, so none expired on it)."""
    from keras_biasinject.serving.app import create_app

    now = [1000.0]
    app = create_app(exports["lm"].path, tmp_path / "s.sqlite", Limits(session_ttl=100.0), clock=lambda: now[0])
    server = app.routes[0].endpoint.__self__
    server.feedback("ttl", {"rating": 0.5})
    now[0] = 1090.0
    assert server.show("ttl", now[0])["updates"] == 1
    now[0] = 1101.0  # idle 101 s of the server's clock > ttl
    with pytest.raises(BadRequest, match="no session 'ttl'") as error:
        server.show("ttl", now[0])
    assert error.value.status == 404
