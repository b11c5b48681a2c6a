"""Issue 17, the server's cheap checks, in-process: request values (rest.py), the JSON parser,
session expiry (store.py), version pruning, and `kbi serve` / `kbi adapt` refusing to start."""

import json
import re
import socket
import threading

import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject.cli.main import main
from keras_biasinject.serving.app import is_loopback, parse_json, prune_versions
from keras_biasinject.serving.guard import refusal
from keras_biasinject.serving.models import find_version
from keras_biasinject.serving.rest import (
    AdaptPolicy, BadRequest, Limits, adapt_batch, feedback_values, finite_number, session_id, signature_tensors,
)
from keras_biasinject.serving.store import SessionLimitError, SQLiteStore

SPECS = {"token_ids": tf.TensorSpec([None, None], tf.int32), "padding_mask": tf.TensorSpec([None, None], tf.int32),
         "control": tf.TensorSpec([None, 1], tf.float32)}


def columns(**changes):
    return {"token_ids": [[1, 2]], "padding_mask": [[1, 1]], "control": [[0.0]], **changes}


@pytest.mark.parametrize("changes, message", [
    ({"token_ids": [[-1, 2]]}, r"'token_ids': -1 is out of range; values must lie in \[0, 64\)"),
    ({"token_ids": [[64, 2]]}, r"'token_ids': 64 is out of range; values must lie in \[0, 64\)"),
    ({"token_ids": [[2 ** 40, 2]]}, r"'token_ids': 1099511627776 is out of range"),
    ({"token_ids": [[1.5, 2]]}, r"'token_ids': values must be integers \(int32\). Got 1.5"),
    ({"token_ids": [[True, 2]]}, r"'token_ids': values must be integers \(int32\). Got True"),
    ({"token_ids": [["a", 2]]}, r"values must be integers"),
    ({"token_ids": [[1], [2, 3]]}, "rectangular array"),
    ({"padding_mask": [[1, -1]]}, r"'padding_mask': -1 is out of range; values must lie in \[0, 2147483648\)"),
    ({"control": [[10 ** 400]]}, "beyond float32's range"),
    ({"control": [[3.5e38]]}, "beyond float32's range"),
    ({"control": [[True]]}, r"values must be numbers \(float32\). Got True"),
    ({"control": [["0"]]}, r"values must be numbers"),
    ({"extra": [[1]]}, r"missing \[\], unknown \['extra'\]"),
])
def test_predict_values_are_refused_before_tensorflow(changes, message):
    with pytest.raises(BadRequest, match=message) as error:
        signature_tensors("serve", SPECS, columns(**changes), Limits(), vocabulary_size=64)
    assert error.value.status == 400


def test_negative_and_fractional_tokens_are_refused_without_a_vocabulary_size():
    for bad in (-1, 0.5):
        with pytest.raises(BadRequest, match="token_ids"):
            signature_tensors("serve", SPECS, columns(token_ids=[[bad, 2]]), Limits())
    tensors = signature_tensors("serve", SPECS, columns(token_ids=[[63, 2]]), Limits())
    assert tensors["token_ids"].numpy().tolist() == [[63, 2]]  # exactly what was sent


@pytest.mark.parametrize("value, message", [
    (10 ** 400, r"`rating` must be a finite number within \+-3.40282e\+38 \(float32\). Got 1000000000"),
    (3.5e38, r"within \+-3.40282e\+38"),
    ([1.0], "must be a finite number"),
    (True, "must be a finite number"),
])
def test_ratings_must_fit_float32(value, message):
    with pytest.raises(BadRequest, match=message):
        feedback_values({"rating": value}, 1)
    assert feedback_values({"rating": 3.4e38}, 1) == [3.4e38]


def test_timestamps_of_400_digits_are_a_400_not_an_overflow():
    with pytest.raises(BadRequest, match=r"`timestamp` must be a finite number. Got 1000000000.*\.\.\."):
        finite_number(10 ** 400, "`timestamp`")


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100_000 + b"]" * 100_000, "malformed JSON: maximum recursion depth"),
    (b'{"rating": ' + b"1" * 5000 + b"}", "malformed JSON: Exceeds the limit"),
    (b"\xff", "malformed JSON"),
    (b"[1]", "must be a JSON object"),
])
def test_hostile_json_is_a_400(raw, message):
    with pytest.raises(BadRequest, match=message) as error:
        parse_json(raw)
    assert error.value.status == 400


@pytest.mark.parametrize("value", ["", "x" * 129, "a/b", "a b", "é", "%61lice", 5, None, ["a"]])
def test_session_ids_are_1_to_128_unreserved_characters(value):
    with pytest.raises(BadRequest, match=r"session id must be 1 to 128 characters of A-Z a-z 0-9 \. _ ~ : @ -"):
        session_id(value)


def test_valid_session_ids_pass_unchanged():
    for value in ("alice", "x" * 128, "user@example.com:42", "a.b_c~d-e"):
        assert session_id(value) == value


ADAPT_SPECS = {k: v for k, v in SPECS.items()}


@pytest.mark.parametrize("changes, message", [
    ({"labels": [[0.5, 1]]}, r"'examples.labels': values must be integers \(int32\). Got 0.5"),
    ({"labels": [[64, 1]]}, r"'examples.labels': 64 is out of range; values must lie in \[0, 64\)"),
    ({"labels": [["a", 1]]}, "'examples.labels': values must be integers"),
    ({"labels": [1]}, r"`examples.labels` must have shape \[1, 2\]"),
    ({"token_ids": [[70, 1]]}, r"'examples.token_ids': 70 is out of range; values must lie in \[0, 64\)"),
    ({"sample_weight": [float("nan")]}, r"'examples.sample_weight': NaN or infinite"),
    ({"sample_weight": [-1.0]}, r"`examples.sample_weight` must be non-negative.*minimum -1.0"),
    ({"sample_weight": [[1.0, 1.0, 1.0]]}, r"must be non-negative numbers of shape \[1, 2\] or \[1\]"),
    ({"segment_ids": [[0, 0]]}, r"missing \[\], unknown \['segment_ids'\]"),
    ({"labels": None}, "must be an object of named inputs plus `labels`"),
])
def test_adapt_batches_are_checked_before_tensorflow(changes, message):
    batch = {**columns(), "labels": [[1, 2]], **changes}
    if changes.get("labels", 0) is None:
        del batch["labels"]
    with pytest.raises(BadRequest, match=message):
        adapt_batch(batch, "examples", ADAPT_SPECS, (64, 2), Limits(), vocabulary_size=64)


def test_a_sound_adapt_batch_comes_back_as_arrays():
    x, y, w = adapt_batch({**columns(), "labels": [[1, 2]], "sample_weight": [0.5]}, "examples", ADAPT_SPECS, (64, 2), Limits())
    assert x["token_ids"].dtype == np.int32 and y.tolist() == [[1, 2]] and w.tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize("kwargs, message", [
    ({"enabled": True}, "needs --adapt-heldout"),
    ({"max_loss_increase": float("inf")}, "`max_loss_increase` must be a finite number >= 0"),
    ({"max_learning_rate": -1.0}, "`max_learning_rate` must be a finite number >= 0"),
    ({"max_steps": 0}, "`max_steps` must be an integer >= 1"),
    ({"keep_versions": True}, "`keep_versions` must be an integer >= 1"),
])
def test_adapt_policy_refuses_bad_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptPolicy(**kwargs)


def test_idle_sessions_expire_and_make_room(tmp_path):
    now = [1000.0]
    store = SQLiteStore(tmp_path / "s.sqlite", ttl=100.0, clock=lambda: now[0])
    store.update("a", lambda current: ([1.0], 5.0), 2)
    store.update("b", lambda current: ([2.0], 5.0), 2)
    with pytest.raises(SessionLimitError):
        store.update("c", lambda current: ([3.0], 5.0), 2)
    now[0] = 1050.0
    store.update("b", lambda current: ([current[0][0] + 1], 6.0), 2)  # b is touched again
    now[0] = 1120.0  # a idle 120 s > ttl; b idle 70 s
    assert store.get("a") is None and store.get("b") == ([3.0], 6.0, 2)
    assert store.update("c", lambda current: ([3.0], 7.0), 2) == ([3.0], 7.0, 1)  # a was deleted to make room
    assert store.update("a", lambda current: ([0.0 if current is None else 9.0], 8.0), 3) == ([0.0], 8.0, 1)  # starts over
    never = SQLiteStore(tmp_path / "s.sqlite", ttl=0, clock=lambda: 1e12)  # 0: sessions never expire
    assert never.get("b") == ([3.0], 6.0, 2)


def test_a_store_of_an_older_version_gains_expiry(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at REAL NOT NULL, "
                   "updates INTEGER NOT NULL)")
        db.execute("INSERT INTO sessions VALUES ('old', '[1.0]', 3.0, 4)")
    store = SQLiteStore(path, ttl=10.0, clock=lambda: 500.0)
    assert store.get("old") == ([1.0], 3.0, 4)  # migrated as touched now, so not expired at once


def test_pruning_keeps_the_newest_versions_and_anything_not_a_version(tmp_path):
    for name in ("1", "2", "3", "10", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "4").write_text("a file, not a version")
    prune_versions(tmp_path, 2, keep="1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "10", "3", "4", "notes"]


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_kbi_serve_refuses_to_start_open_or_without_its_store_folder(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "lm"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"kbi serve: error: serve: --host 0.0.0.0 reaches beyond this machine; pass --token-file FILE.*\n", err)
    assert main(["serve", str(tmp_path / "lm")]) == 2
    assert "is not a folder; give BASE/NAME" in capsys.readouterr().err
    (tmp_path / "lm").mkdir()
    assert main(["serve", str(tmp_path / "lm"), "--store", str(tmp_path / "missing" / "s.sqlite")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "missing").exists()
    (tmp_path / "token").write_text("  \n")
    assert main(["serve", str(tmp_path / "lm"), "--token-file", str(tmp_path / "token")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "lm"), "--allow-adapt"]) == 2
    assert "--allow-adapt needs --source" in capsys.readouterr().err


def test_kbi_adapt_against_a_refused_connection_says_so(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    (tmp_path / "ex.json").write_text(json.dumps({"token_ids": [[1]], "labels": [[1]]}))
    assert main(["adapt", f"http://127.0.0.1:{port}", "--examples", str(tmp_path / "ex.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach http://127.0.0.1:{port}/v1/models/model:adapt" in err
    assert main(["adapt", f"http://127.0.0.1:{port}", "--examples", str(tmp_path / "ex.json"), "--heldout", "h.json"]) == 2
    assert "are the server's now" in capsys.readouterr().err


# Review of issue 17's fixes: cross-site and rebinding requests, store startup, tokens, limits, versions.


@pytest.mark.parametrize("headers, token, refused", [
    ({"host": "127.0.0.1:8501"}, False, None),
    ({"host": "localhost:8501", "origin": "http://localhost:8501"}, False, None),  # the server's own origin
    ({"host": "[::1]:8501"}, False, None),
    ({"host": "127.8.9.10"}, False, None),
    ({}, False, None),  # HTTP/1.0 without Host: not a browser
    ({"host": "127.0.0.1:8501", "origin": "https://evil.example"}, False, "Origin 'https://evil.example' is not this server"),
    ({"host": "127.0.0.1:8501", "origin": "http://127.0.0.1:9999"}, False, "cross-origin request refused"),
    ({"host": "127.0.0.1:8501", "origin": "null"}, False, "cross-origin request refused"),  # sandboxed frames, file:// pages
    ({"host": "api.example.com", "origin": "https://evil.example"}, True, "cross-origin request refused"),  # even with a token
    ({"host": "rebind.evil.example:8501"}, False, "Host 'rebind.evil.example:8501' is not a loopback name"),
    ({"host": "127.0.0.1.evil.example"}, False, "is not a loopback name"),
    ({"host": "localhost:x"}, False, "is not a loopback name"),
    ({"host": "api.example.com"}, True, None),  # with a token, a public name (behind a proxy) is served
    ({"host": "api.example.com", "origin": "https://api.example.com"}, True, None),
    ({"host": "127.0.0.1:8501", "x-forwarded-for": "203.0.113.5"}, False, r"a proxy header \(x-forwarded-for\)"),
    ({"host": "127.0.0.1:8501", "forwarded": "for=203.0.113.5"}, False, "--token-file"),
    ({"host": "127.0.0.1:8501", "x-forwarded-for": "203.0.113.5"}, True, None),
])
def test_cross_site_rebound_and_proxied_requests_are_refused(headers, token, refused):
    reason = refusal(headers, token)
    assert reason is None if refused is None else re.search(refused, reason), reason


def test_version_folders_are_ascii_digits(tmp_path):
    for name in ("1", "²", "3"):
        (tmp_path / "lm" / name).mkdir(parents=True)
    (tmp_path / "lm" / "²" / "saved_model.pb").write_bytes(b"")
    prune_versions(tmp_path / "lm", 1, keep="3")  # before: int("²") raised ValueError
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["3", "²"]
    assert find_version(tmp_path / "lm") == ("lm", 3, tmp_path / "lm" / "3")
    with pytest.raises(FileNotFoundError, match="holds no version folder"):
        find_version(tmp_path / "lm" / "²")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, r"--max-batch must be an integer >= 1. Got 0"),
    ({"max_sequence": -5}, r"--max-sequence must be an integer >= 1. Got -5"),
    ({"max_sessions": 0}, r"--max-sessions must be an integer >= 1"),
    ({"max_batch": True}, r"--max-batch must be an integer >= 1. Got True"),
    ({"max_clock_skew": float("nan")}, r"--max-clock-skew must be a finite number of seconds >= 0"),
    ({"session_ttl": -1.0}, r"--session-ttl must be a finite number of seconds >= 0"),
])
def test_limits_refuse_zero_and_negative_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)
    assert Limits(max_batch=np.int64(2)).max_batch == 2


def test_kbi_serve_refuses_bad_limits_tokens_and_stores_in_one_line(tmp_path, capsys):
    (tmp_path / "lm").mkdir()
    for flag in ("--max-batch", "--max-sequence", "--max-sessions"):
        assert main(["serve", str(tmp_path / "lm"), flag, "0"]) == 2
        assert re.fullmatch(rf"kbi serve: error: serve: {flag} must be an integer >= 1. Got 0.\n", capsys.readouterr().err)
    (tmp_path / "token").write_text("tökén-5f0c\n", encoding="utf-8")  # headers arrive as latin-1: it could never match
    assert main(["serve", str(tmp_path / "lm"), "--token-file", str(tmp_path / "token")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds characters other than printable ASCII" in err
    (tmp_path / "store").mkdir()  # a folder, not a file: sqlite3 cannot open it
    assert main(["serve", str(tmp_path / "lm"), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"session store {str(tmp_path / 'store')!r} cannot be opened" in err
    missing = str(tmp_path / "missing.txt")
    assert main(["serve", str(tmp_path / "lm"), "--token-file", missing]) == 2
    assert capsys.readouterr().err == f"kbi serve: error: --token-file {missing!r}: cannot read it (No such file or directory); give a file holding the token.\n"
    assert main(["adapt", "http://127.0.0.1:9", "--examples", missing]) == 2
    assert capsys.readouterr().err == f"kbi adapt: error: --examples {missing!r}: cannot read it (No such file or directory); give a JSON file.\n"


def test_replicas_starting_together_on_an_old_store_migrate_it_once(tmp_path):
    import sqlite3

    for attempt in range(5):
        path = tmp_path / f"old{attempt}.sqlite"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at REAL NOT NULL, "
                       "updates INTEGER NOT NULL)")
            db.execute("INSERT INTO sessions VALUES ('old', '[1.0]', 3.0, 4)")
        barrier, errors = threading.Barrier(8), []

        def start():
            barrier.wait()
            try:
                SQLiteStore(path, ttl=10.0, clock=lambda: 500.0)
            except Exception as error:  # before: sqlite3.OperationalError "duplicate column name: touched_at"
                errors.append(repr(error))

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert SQLiteStore(path, ttl=10.0, clock=lambda: 500.0).get("old") == ([1.0], 3.0, 4)


def test_a_per_example_sample_weight_covers_each_of_its_labels():
    x, y, w = adapt_batch({**columns(), "labels": [[1, 2]], "sample_weight": [0.5]}, "examples", ADAPT_SPECS, (64, 2), Limits())
    assert w.shape == y.shape == (1, 2) and w.tolist() == [[0.5, 0.5]]  # before: shape (1,), which Keras refused (a 500)
