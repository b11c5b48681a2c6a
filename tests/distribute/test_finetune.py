"""`finetune` itself under MirroredStrategy, and resumed at the exact step after a SIGKILL.

All three runs train the same recipe (real MiniLM, real reviews, dropout 0, 2 epochs of 4 steps,
a step-level backup every 2 steps): one uninterrupted in this process, one on two logical CPU
devices, one killed with SIGKILL after its first backup and run again.
Tolerances: 1e-6 for the resumed run (the same operations in the same order); 1e-5 for two
replicas (their gradients are summed in another order).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from keras_biasinject.recipes import finetune, load_recipe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = """
task = "classification"
[model]
spec = "minilm-l6"
sequence_length = 32
dropout = 0.0
[data]
source = "small_fine_foods"
text_column = "review"
label_column = "label"
control_map = { great = 1.0, other = 1.0 }
[inject]
rank = 2
trainable = ["logits"]
[train]
methods = ["bias_injection"]
epochs = 2
batch_size = 8
learning_rate = 5e-3
max_train_examples = 32
max_eval_examples = 16
save_freq = 2
"""
STEPS = 8


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}


def _adapter(run):
    weights = load_file(str(run / "adapter" / "adapter_weights.safetensors"))
    assert any(k.endswith("lora_b") and np.abs(v).max() > 0 for k, v in weights.items())  # it did train
    return weights


def _assert_close(a, b, atol):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)
    print(f"max abs difference of {len(a)} adapter weights: {max(float(np.abs(a[k] - b[k]).max()) for k in a):.2e}")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "steps.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    report = finetune(load_recipe(recipe_file), run, verbose=0)
    assert "resumed_from_step" not in report["results"][0]
    assert not (run / "backup" / "bias_injection").exists()  # removed once the method finished
    return run, report


def test_finetune_under_mirrored_strategy_matches_one_device(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "mirrored"
    result = subprocess.run([sys.executable, os.path.join(HERE, "finetune_mirrored.py"), str(recipe_file), str(run)],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["results"][0]["base_weights_unchanged"] is True
    _assert_close(_adapter(run), _adapter(uninterrupted[0]), atol=1e-5)
    assert abs(report["results"][0]["value"] - uninterrupted[1]["results"][0]["value"]) <= 1e-6


def test_killed_finetune_resumes_at_the_backed_up_step(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "keras_biasinject.cli.main", "finetune", str(recipe_file), "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    state = run / "backup" / "bias_injection" / "state"
    deadline = time.time() + 400
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (run / "report.json").exists()
    torn = run / "backup" / "bias_injection" / ".state.partial-killed"  # a backup the kill interrupted mid-write
    torn.mkdir(exist_ok=True)
    (torn / "latest.weights.h5").write_bytes(b"half a file")

    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    resumed = report["results"][0]["resumed_from_step"]
    assert resumed % 2 == 0 and 2 <= resumed < STEPS  # from its last backup, not from step 0
    print(f"resumed from step {resumed} of {STEPS}")
    _assert_close(_adapter(run), _adapter(uninterrupted[0]), atol=1e-6)
    assert report["results"][0]["value"] == uninterrupted[1]["results"][0]["value"]
    assert not (run / "backup" / "bias_injection").exists()
