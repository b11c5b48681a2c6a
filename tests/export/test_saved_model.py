"""SavedModel export: loads and runs with TensorFlow alone, equal to the Keras model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject import DecayFeedback, FeedbackHead, add_feedback_head, inject, remove_feedback_head
from keras_biasinject.export import export_saved_model, next_version
from keras_biasinject.atomic import STALE_SECONDS
from keras_biasinject.cli.main import main as kbi
from keras_biasinject.export.saved_model import check_version, version_folder
from tests.rewrite.tiny_models import BATCH, TINY, VOCAB, V, gpt2, out, tokens, train
from tests.test_atomic import killed_writer

# Runs in a fresh process: TensorFlow only, then proves neither keras_hub nor this package came in.
TF_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    path, requests, result = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    loaded = tf.saved_model.load(path)
    outputs = {}
    for i, (signature, inputs) in enumerate(requests):
        fn = loaded.signatures[signature]
        args = {k: tf.constant(np.asarray(v["value"], v["dtype"])) for k, v in inputs.items()}
        outputs[str(i)] = {k: v.numpy().tolist() for k, v in fn(**args).items()}
    banned = [m for m in sys.modules if m.split(".")[0] in ("keras_hub", "keras_biasinject", "keras_nlp")]
    assert not banned, banned
    json.dump(outputs, open(result, "w"))
""")

# TensorFlow's CLI from the interpreter's own environment, whether or not the venv is activated.
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def run_tf_only(tmp_path, path, requests):
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    (tmp_path / "tf_only.py").write_text(TF_ONLY)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, str(tmp_path / "tf_only.py"), path, str(tmp_path / "requests.json"), str(tmp_path / "out.json")],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out.json").read_text())
    return [{k: np.asarray(v) for k, v in data[str(i)].items()} for i in range(len(requests))]


def request(x, **extra):
    fields = {k: {"value": np.asarray(v).tolist(), "dtype": "int32"} for k, v in x.items()}
    fields.update({k: {"value": np.asarray(v).tolist(), "dtype": dtype} for k, (v, dtype) in extra.items()})
    return fields


@pytest.fixture(scope="module")
def lm():
    model = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4, control_dim=2)
    train(model, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 2)).astype("float32")})
    model.add_control("positive", [1.0, 0.5])
    model.add_control("negative", [-1.0, 0.0])
    return model


def test_serve_runs_with_tensorflow_alone_and_equals_keras(lm, tmp_path):
    feedback = DecayFeedback(control_dim=2, half_life=10.0)
    path = export_saved_model(lm, tmp_path / "serving", "lm", feedback=feedback)
    assert path == str(tmp_path / "serving" / "lm" / "1")
    cases, requests = [], []
    rng = np.random.default_rng(3)
    for batch, seq in [(1, 5), (3, 8)]:  # two batch sizes, two sequence lengths
        x = {"token_ids": rng.integers(1, VOCAB, (batch, seq)), "padding_mask": np.ones((batch, seq), "int32")}
        c = rng.normal(size=(batch, 2)).astype("float32")
        cases.append(out(lm, {**x, "control": c}))
        requests.append(["serve", request(x, control=(c, "float32"))])
    x = {"token_ids": rng.integers(1, VOCAB, (3, 6)), "padding_mask": np.ones((3, 6), "int32")}
    named = out(lm, {**x, "control": ["positive", "negative", "positive"]})
    requests.append(["serve_named", request(x, control_name=(["positive", "negative", "positive"], "str"))])
    state, signal_, elapsed = rng.normal(size=(2, 2)).astype("float32"), rng.normal(size=(2, 2)).astype("float32"), np.array([0.0, 10.0], "float32")
    control, new_state = (keras.ops.convert_to_numpy(t) for t in feedback(signal_, state=state, elapsed=elapsed))
    requests.append(["feedback_step", {"state": {"value": state.tolist(), "dtype": "float32"},
                                       "feedback": {"value": signal_.tolist(), "dtype": "float32"},
                                       "elapsed": {"value": elapsed.tolist(), "dtype": "float32"}}])
    prompt = tokens(batch=2)
    prompt["padding_mask"][:, 3:] = 0  # 3 prompt tokens, 5 to generate
    gc = np.array([[1.0, 0.5], [-1.0, 0.0]], "float32")
    lm.compile(sampler="greedy")
    generated = keras.ops.convert_to_numpy(lm.generate(dict(prompt), stop_token_ids=None, control=gc)["token_ids"])
    requests.append(["generate", request(prompt, control=(gc, "float32"))])
    results = run_tf_only(tmp_path, path, requests)
    assert np.array_equal(results[4]["token_ids"], generated)  # the same greedy continuation
    for expected, got in zip(cases, results[:2]):
        np.testing.assert_allclose(got["logits"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[2]["logits"], named, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[3]["control"], control, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[3]["new_state"], new_state, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state[1], 0.5 * state[1] + signal_[1], rtol=1e-5)  # one half-life later

    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in ["signature_def['serve']", "signature_def['serve_named']", "signature_def['feedback_step']", "signature_def['generate']",
                 "inputs['control']", "inputs['control_name']", "inputs['token_ids']", "outputs['logits']"]:
        assert text in shown.stdout, text


def test_keras_own_export_serves_the_control(lm, tmp_path):
    """`model.export(path)` (Keras' own) puts `control` in the signature, and TensorFlow alone serves it."""
    path = str(tmp_path / "keras_export")
    lm.export(path)
    rng = np.random.default_rng(5)
    x = {"token_ids": rng.integers(1, VOCAB, (2, 6)), "padding_mask": np.ones((2, 6), "int32")}
    c = rng.normal(size=(2, 2)).astype("float32")
    (got,) = run_tf_only(tmp_path, path, [["serving_default", request(x, control=(c * 3, "float32"))]])
    # 1e-5: the export's graph (TensorFlow, no Keras) sums float32 logits in another order than the eager model.
    np.testing.assert_allclose(got["output_0"], out(lm, {**x, "control": c * 3}), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got["output_0"], out(lm, x), atol=1e-3)  # the served control steers
    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default"],
                           capture_output=True, text=True, timeout=120)
    assert "inputs['control'] tensor_info:" in shown.stdout and "shape: (-1, 2)" in shown.stdout, shown.stdout


def test_merged_control_and_classifier_probabilities(lm, tmp_path):
    spec = TINY["BERT"]
    cls, kwargs, task = spec.backbone, spec.kwargs, spec.task
    keras.utils.set_random_seed(0)
    clf = inject(getattr(keras_hub.models, task)(backbone=getattr(keras_hub.models, cls)(**kwargs), num_classes=3, preprocessor=None),
                 rank=2, trainable=["logits"])
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(1, V, (2, 7)), "padding_mask": np.ones((2, 7), "int32"), "segment_ids": np.zeros((2, 7), "int32")}
    c = np.array([[0.7], [-0.2]], "float32")
    clf_path = export_saved_model(clf, tmp_path, "clf")
    merged_path = export_saved_model(lm, tmp_path, "lm_positive", control="positive")
    lx = tokens()
    requests = [["serve", request(x, control=(c, "float32"))], ["serve", request(lx)]]
    got_clf = run_tf_only(tmp_path, clf_path, requests[:1])[0]
    logits = out(clf, {**x, "control": c})
    np.testing.assert_allclose(got_clf["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_clf["probabilities"], keras.ops.convert_to_numpy(keras.ops.softmax(logits)), rtol=1e-5, atol=1e-6)
    got_merged = run_tf_only(tmp_path, merged_path, requests[1:])[0]
    steered = out(lm, {**lx, "control": np.tile([[1.0, 0.5]], (BATCH, 1)).astype("float32")})
    np.testing.assert_allclose(got_merged["logits"], steered, rtol=1e-5, atol=1e-5 * np.abs(steered).max())
    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", merged_path, "--tag_set", "serve", "--signature_def", "serve"],
                           capture_output=True, text=True, timeout=120).stdout
    assert "inputs['token_ids']" in shown and "control" not in shown  # merged: the base's inputs only


def metadata_of(path):
    file = os.path.join(path, "assets.extra", "keras_biasinject.json")
    return json.loads(open(file).read()) if os.path.isfile(file) else None


def test_a_feedback_head_adds_feedback_to_serve_and_generate_and_changes_nothing_else(tmp_path):
    model = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4, control_dim=2)
    train(model, {**tokens(), "control": np.random.default_rng(0).normal(size=(BATCH, 2)).astype("float32")})
    model.add_control("positive", [1.0, 0.5])
    feedback = DecayFeedback(control_dim=2, feedback_dim=1, half_life=10.0)
    plain_path = export_saved_model(model, tmp_path, "plain", feedback=feedback)
    add_feedback_head(model, FeedbackHead(1))
    path = export_saved_model(model, tmp_path, "head", feedback=feedback)

    x = tokens(seed=4)
    x["padding_mask"][0, 5:] = 0  # right padding: "last" pooling reads token 4 of row 0
    c = np.random.default_rng(5).normal(size=(BATCH, 2)).astype("float32")
    prompt = tokens(batch=2)
    prompt["padding_mask"][:, 3:] = 0  # 3 prompt tokens, 5 to generate
    gc = c[:2]
    requests = [["serve", request(x, control=(c, "float32"))],
                ["serve_named", request(x, control_name=(["positive"] * BATCH, "str"))],
                ["generate", request(prompt, control=(gc, "float32"))]]
    served, named, generated = run_tf_only(tmp_path, path, requests)  # TensorFlow alone, head included
    plain = tf.saved_model.load(plain_path).signatures
    plain_served = plain["serve"](**{k: tf.constant(v["value"], v["dtype"]) for k, v in requests[0][1].items()})
    plain_generated = plain["generate"](**{k: tf.constant(v["value"], v["dtype"]) for k, v in requests[2][1].items()})

    # The head's output is added; the model's own outputs are those of the export without it, bit for bit.
    assert sorted(served) == ["feedback", "logits"] and sorted(plain_served) == ["logits"]
    assert np.array_equal(served["logits"], plain_served["logits"].numpy())
    assert np.array_equal(generated["token_ids"], plain_generated["token_ids"].numpy())
    np.testing.assert_allclose(served["logits"], keras.ops.convert_to_numpy(model({**x, "control": c})["logits"]), rtol=1e-5, atol=1e-5)
    # serve: the head's per-token readings pooled over the padding mask, as the Keras model reads them.
    assert served["feedback"].shape == (BATCH, 1)
    np.testing.assert_allclose(served["feedback"], model.read_feedback(x, control=c), rtol=0, atol=1e-6)
    np.testing.assert_allclose(named["feedback"], model.read_feedback(x, control="positive"), rtol=0, atol=1e-6)
    # generate: the reading of each finished sequence, as `generate(return_feedback=True)` gives it.
    model.compile(sampler="greedy")
    tokens_keras, reading = model.generate(dict(prompt), stop_token_ids=None, control=gc, return_feedback=True)
    assert np.array_equal(generated["token_ids"], keras.ops.convert_to_numpy(tokens_keras["token_ids"]))
    np.testing.assert_allclose(generated["feedback"], reading, rtol=0, atol=1e-6)

    assert metadata_of(path)["feedback_head"] == {"feedback_dim": 1, "pooling": "last", "activation": "sigmoid",
                                                  "reading_range": [0.0, 1.0]}
    # no head: no head's metadata; an injected model's neutral control and GPT2's learned-position limit for the text routes
    assert sorted(metadata_of(plain_path)) == ["feedback", "max_sequence_length", "neutral_control", "vocabulary_size"]
    assert metadata_of(path)["feedback"] == metadata_of(plain_path)["feedback"]
    assert metadata_of(path)["vocabulary_size"] == metadata_of(plain_path)["vocabulary_size"] == VOCAB

    wide = DecayFeedback(control_dim=2, feedback_dim=3, half_life=10.0)  # the head reads 1 value
    with pytest.raises(ValueError, match=r"feedback_dim=3, but the model's feedback head reads 1 value\(s\). Build it with DecayFeedback\(feedback_dim=1"):
        export_saved_model(model, tmp_path, "wide", feedback=wide)
    assert not (tmp_path / "wide").exists()

    model.compile(sampler="beam")  # its own search loop: no hidden states to read
    with pytest.raises(ValueError, match="BeamSampler runs its own search loop.*compile\\(sampler='greedy'\\)"):
        export_saved_model(model, tmp_path, "beam")
    assert not (tmp_path / "beam").exists()
    remove_feedback_head(model)


def test_a_classifier_head_reads_pooled_and_merging_asks_to_take_it_off(tmp_path):
    spec = TINY["BERT"]
    cls, kwargs, task = spec.backbone, spec.kwargs, spec.task
    keras.utils.set_random_seed(0)
    clf = inject(getattr(keras_hub.models, task)(backbone=getattr(keras_hub.models, cls)(**kwargs), num_classes=3, preprocessor=None),
                 rank=2, trainable=["logits"])
    plain_path = export_saved_model(clf, tmp_path, "plain")
    plain = tf.saved_model.load(plain_path).signatures["serve"]
    add_feedback_head(clf, FeedbackHead(2, pooling="first", activation="linear"))
    path = export_saved_model(clf, tmp_path, "head")
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(1, V, (2, 7)), "padding_mask": np.ones((2, 7), "int32"), "segment_ids": np.zeros((2, 7), "int32")}
    c = np.array([[0.7], [-0.2]], "float32")
    args = {**{k: tf.constant(v, tf.int32) for k, v in x.items()}, "control": tf.constant(c)}
    served, before = tf.saved_model.load(path).signatures["serve"](**args), plain(**args)
    assert sorted(served) == ["feedback", "logits", "probabilities"]
    for key in ("logits", "probabilities"):
        assert np.array_equal(served[key].numpy(), before[key].numpy())
    np.testing.assert_allclose(served["feedback"].numpy(), clf.read_feedback(x, control=c), rtol=0, atol=1e-6)
    text = {"max_sequence_length": kwargs["max_sequence_length"], "neutral_control": [0.0]}  # for the text routes
    assert metadata_of(path) == {"feedback_head": {"feedback_dim": 2, "pooling": "first", "activation": "linear",
                                                   "reading_range": [None, None]},  # unbounded: null, not Infinity
                                 "vocabulary_size": V, **text}
    assert metadata_of(plain_path) == {"vocabulary_size": V, **text}  # no head, no DecayFeedback; no preprocessor: no task

    with pytest.raises(ValueError, match="plain BertTextClassifier, which cannot carry the feedback head. Export without `control`"):
        export_saved_model(clf, tmp_path, "merged", control=[1.0])
    assert not (tmp_path / "merged").exists()
    reading = clf.read_feedback(x, control=c)
    head = remove_feedback_head(clf)  # the fix the error gives
    merged = export_saved_model(clf, tmp_path, "merged", control=[1.0])
    add_feedback_head(clf, head)
    assert sorted(tf.saved_model.load(merged).signatures["serve"].structured_outputs) == ["logits", "probabilities"]
    assert np.array_equal(clf.read_feedback(x, control=c), reading)  # the head is back as it was


def test_versions_are_never_overwritten_silently(lm, tmp_path):
    umask = os.umask(0o022)
    try:
        first = export_saved_model(lm, tmp_path, "lm")
    finally:
        os.umask(umask)
    modes = {p: os.stat(os.path.join(d, p)).st_mode & 0o777 for d, dirs, files in os.walk(first) for p in dirs + files}
    assert os.stat(first).st_mode & 0o777 == 0o755 and set(modes.values()) == {0o755, 0o644}, modes  # as umask 0o022 gives
    assert next_version(tmp_path, "lm") == 2
    with pytest.raises(FileExistsError, match="exists; TF Serving may be serving it. Pass overwrite=True"):
        export_saved_model(lm, tmp_path, "lm", version=1)
    stamp = os.stat(os.path.join(first, "saved_model.pb")).st_mtime_ns
    assert os.stat(os.path.join(first, "saved_model.pb")).st_mtime_ns == stamp
    dead = killed_writer(tmp_path / "lm" / "2")  # what a killed export leaves: young, its writer gone
    old = tmp_path / "lm" / ".3.partial-x1"  # an hour untouched (a writer on another host, or older code)
    old.mkdir()
    os.utime(old, (time.time() - STALE_SECONDS - 10,) * 2)
    export_saved_model(lm, tmp_path, "lm", version=1, overwrite=True)
    assert sorted(os.listdir(tmp_path / "lm")) == ["1"]  # replaced in place, the partial folders cleaned up
    assert not dead.exists()
    with pytest.raises(ValueError, match="`version` must be a positive integer"):
        export_saved_model(lm, tmp_path, "lm", version=0)
    with pytest.raises(ValueError, match="this model has no adapters"):
        export_saved_model(gpt2(), tmp_path, "plain", control=[1.0])


def test_versions_must_fit_int64_and_every_numeric_name_counts(tmp_path):
    assert check_version(np.int64(7)) == 7 and type(check_version(np.uint8(3))) is int  # numpy integers taken
    assert check_version(2**63 - 1) == 2**63 - 1
    for bad in (2**63, 2**70, True, 0, -1, 1.0, "3"):
        with pytest.raises(ValueError, match=r"`version` must be"):
            check_version(bad)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "5").write_text("not a version, but it blocks the name")
    (tmp_path / "lm" / "3").mkdir()
    assert next_version(tmp_path, "lm") == 6
    assert version_folder(tmp_path, "lm", np.int64(8)) == tmp_path / "lm" / "8"
    with pytest.raises(ValueError, match=r"lm/5' is a file, not a version folder. Move it away"):
        version_folder(tmp_path, "lm", 5, overwrite=True)


def test_a_decay_feedback_of_another_width_is_refused_up_front(lm, tmp_path):
    with pytest.raises(ValueError, match=r"DecayFeedback has control_dim=3, but the model's control has 2 value\(s\). "
                                         r"Build it with DecayFeedback\(control_dim=2"):
        export_saved_model(lm, tmp_path, "lm", feedback=DecayFeedback(control_dim=3, half_life=10.0))
    with pytest.raises(ValueError, match=r"`version` must be at most 2\*\*63 - 1 \(TF Serving reads versions as int64\)"):
        export_saved_model(lm, tmp_path, "lm", version=2**70)
    assert os.listdir(tmp_path) == []  # nothing written


def unwritable_folder(tmp_path):
    """A folder that refuses new files to this process: read-only for a user; for root, who writes
    anywhere a mode allows, sysfs (no new files there, not even for root)."""
    if os.geteuid() == 0:
        return "/sys"
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def test_unwritable_destinations_are_refused_before_the_export_is_built(lm, tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "lm").write_text("")
    read_only = unwritable_folder(tmp_path)
    cases = [(tmp_path / "a_file", r"a_file' is a file, so .*a_file/lm' cannot be a folder"),
             (tmp_path / "a_file" / "deeper", r"a_file' is a file, so"),
             (tmp_path / "base", r"base/lm' is a file\. Choose another destination \(kbi export --out\)"),
             (read_only, rf"cannot write in '{read_only}' \(.*\). Choose a folder you can write in")]
    for base, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            export_saved_model(lm, base, "lm")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "base"] + (["read_only"] if os.geteuid() else [])
    assert os.listdir(tmp_path / "base") == ["lm"] and (tmp_path / "a_file").read_text() == ""


def test_kbi_export_onto_a_file_says_so_in_one_line(lm, tmp_path, capsys):
    lm.save(tmp_path / "lm.keras")
    (tmp_path / "a_file").write_text("")
    assert kbi(["export", str(tmp_path / "lm.keras"), "--out", str(tmp_path / "a_file"), "--name", "lm"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("kbi export")]  # Keras' load warnings aside
    assert line.startswith("kbi export: error: export_saved_model: ") and "a_file' is a file" in line


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_version(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        import keras_hub
        from keras_biasinject import inject
        from keras_biasinject.export import export_saved_model
        from tests.rewrite.tiny_models import gpt2
        lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(num_layers=2), preprocessor=None))
        export_saved_model(lm, {str(tmp_path)!r}, "lm")
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "lm").is_dir() and any(p.name.startswith(".1.partial-") for p in (tmp_path / "lm").iterdir()):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the export finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "lm" / "1").exists()  # TF Serving sees no version
    assert next_version(tmp_path, "lm") == 1
