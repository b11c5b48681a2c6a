"""`kbi` end to end on a small budget: real MiniLM, real reviews, real SmolLM2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from keras_biasinject.cli.main import build_parser, main

SMALL = """
task = "classification"
[model]
spec = "minilm-l6"
sequence_length = 32
[data]
source = "small_fine_foods"
text_column = "review"
label_column = "label"
control_map = {{ great = 1.0, other = 1.0 }}
[inject]
rank = 2
trainable = ["logits"]
[train]
methods = {methods}
epochs = {epochs}
batch_size = 8
max_train_examples = {train}
max_eval_examples = 16
"""

# TensorFlow's CLI from the interpreter's own environment, whether or not the venv is activated.
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def kbi(*args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "keras_biasinject.cli.main", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_every_command_has_help(capsys):
    for command in ["finetune", "demo", "evaluate", "generate", "loop", "export", "serve", "adapt", "models"]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: kbi {command}" in capsys.readouterr().out


def test_models_lists_the_built_in_checkpoints(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm-l6" in out and "smollm2-135m" in out


def test_config_errors_name_the_key(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(SMALL.format(methods='["base"]', epochs=1, train=16).replace("epochs = 1", "epoch = 1"))
    assert main(["finetune", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key(s) ['epoch'] in [train]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["finetune", str(recipe), "--out", str(tmp_path / "run"), "--set", "epochs"]) == 2
    assert "kbi finetune: error: --set takes KEY=VALUE" in capsys.readouterr().err


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


@pytest.mark.parametrize("toml, sets, message", [
    ('epochs = "1"', [], r"kbi finetune: error: recipe: \[train\]: `epochs` must be a positive integer. Got epochs='1'"),
    ("epochs = 1", ["train.epochs="], r"--set train.epochs= has no value. Give one \(e.g. train.epochs=3\)"),
    ("epochs = 1", ["train.epochs=" + "9" * 5000], r"--set train.epochs: the value has 5,000 characters; at most 1,000"),
    ("epochs = 1", ["train.epochs=" + "9" * 100], r"`epochs` must be at most 2,147,483,647. Got epochs=9{20}\.\.\. \(100 digits\)"),
    ("epochs = 1", ["train.epochs=" + "9" * 999], r"`train.epochs` = an integer of 999 digits is out of range: .* a count at most 2,147,483,647"),
    ("epochs = 1", ["train.learning_rate=" + "9" * 400], r"recipe: `train.learning_rate` = an integer of 400 digits is out of range"),
    ("epochs = 1", ["inject.alpha=" + "9" * 400], r"recipe: `inject.alpha` = an integer of 400 digits is out of range"),
    ("epochs = 1", ["train.epochs=True"], r"`epochs` must be a positive integer. Got epochs=True"),
    ("epochs = 1", ["train.epochs=1.5"], r"`epochs` must be a positive integer. Got epochs=1.5"),
    ("epochs = 1", ["train.learning_rate=1e999"], r"recipe: `train.learning_rate` = inf is not a finite number"),
    ("epochs = 1", ["inject.alpha=1e999"], r"recipe: `inject.alpha` = inf is not a finite number"),
    ("epochs = 1", ["inject.targets='(('"], r"`targets`='\(\(' is not a valid regex"),
    ("epochs = 1", ["inject.blocks=0"], r"`blocks` must be a list of block indices \(e.g."),
    ("epochs = 1", ["inject.targets=None"], r"`targets` must name the layers to adapt"),
])
def test_bad_values_exit_2_with_one_line_naming_the_key(tmp_path, capsys, toml, sets, message):
    import re

    recipe = tmp_path / "r.toml"
    recipe.write_text(SMALL.format(methods='["base"]', epochs=1, train=16).replace("epochs = 1", toml))
    argv = ["finetune", str(recipe), "--out", str(tmp_path / "run")]
    for item in sets:
        argv += ["--set", item]
    assert re.search(message, _one_line_error(capsys, argv))
    assert not (tmp_path / "run").exists()


def test_file_errors_exit_2_with_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(SMALL.format(methods='["base"]', epochs=1, train=16))
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, ["finetune", "no_such_recipe", "--out", str(tmp_path / "run")])
    assert "no recipe file 'no_such_recipe'" in err
    err = _one_line_error(capsys, ["finetune", str(recipe), "--out", str(tmp_path / "file" / "run")])  # NotADirectoryError
    assert "kbi finetune: error: " in err and "file" in err
    run = tmp_path / "cut"
    run.mkdir()
    (run / "report.json").write_text('{"recipe": {"task": "classif')  # truncated
    err = _one_line_error(capsys, ["evaluate", str(run)])
    assert "report.json' is not a valid report (Unterminated string" in err and "Restore it, or run `kbi finetune`" in err


def test_only_our_own_type_errors_are_user_errors():
    from keras_biasinject.cli.main import _raised_by_us
    from keras_biasinject.models.load import load

    with pytest.raises(TypeError) as ours:
        load(5)
    with pytest.raises(TypeError) as python:
        len(None)
    assert _raised_by_us(ours.value) and not _raised_by_us(python.value)


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A finished classification run on a small budget: (run folder, kbi's result)."""
    tmp_path = tmp_path_factory.mktemp("classify")
    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL.format(methods='["base", "keras_lora", "bias_injection"]', epochs=1, train=32))
    run = tmp_path / "run"
    return run, kbi("finetune", str(recipe), "--out", str(run), "--set", "inject.rank=2")


@pytest.mark.slow
def test_finetune_then_evaluate_on_real_reviews(classify_run):
    run, result = classify_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    methods = [row["method"] for row in report["results"]]
    assert methods == ["base", "keras_lora", "bias_injection", "bias_injection (control off)"]
    for row in report["results"]:
        assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0 and row["trainable_params"] > 0
    injected = report["results"][2]
    assert injected["base_weights_unchanged"] is True
    assert report["results"][0]["trainable_params"] == 770  # the head: 384 x 2 + 2
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "classifier.keras").is_file()
    assert "| bias_injection |" in result.stdout  # the results table

    result = kbi("evaluate", str(run), "--control", "1", "--control", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("control")]
    on, off = (float(line.split()[-1]) for line in lines)
    assert on == pytest.approx(injected["value"], abs=1e-6)  # the reloaded adapter scores the same
    assert off == pytest.approx(report["results"][3]["value"], abs=1e-6)

    serving = run.parent / "serving"
    result = kbi("export", str(run), "--out", str(serving), "--name", "reviews", "--feedback-half-life", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", str(serving / "reviews" / "1"), "--all"], capture_output=True, text=True).stdout
    assert "signature_def['serve']" in shown and "signature_def['feedback_step']" in shown and "outputs['probabilities']" in shown
    result = kbi("export", str(run), "--out", str(serving), "--name", "reviews", "--version", "1")
    assert result.returncode == 2 and "exists; TF Serving may be serving it" in result.stderr


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_methods(tmp_path):
    recipe = tmp_path / "resume.toml"
    recipe.write_text(SMALL.format(methods='["base", "bias_injection"]', epochs=3, train=64))
    run = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # A shell starting a job in the background (as CI may) makes it ignore SIGINT, and children
    # inherit that: give the run the default handling, as when started from a terminal.
    process = subprocess.Popen([sys.executable, "-m", "keras_biasinject.cli.main", "finetune", str(recipe), "--out", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 400
    while not (run / "backup" / "bias_injection" / "state").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)  # wait until the second method has backed up its first epoch
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Run the same command again to resume" in err, err[-3000:]
    first = json.loads((run / "report.json").read_text())
    assert [row["method"] for row in first["results"]] == ["base"]
    assert (run / "backup" / "bias_injection" / "state" / "latest.weights.h5").exists()  # kept for the resume
    # A backup torn by a kill during the next write is ignored: the complete one is used.
    torn = run / "backup" / "bias_injection" / ".state.partial-killed"
    torn.mkdir()
    (torn / "latest.weights.h5").write_bytes(b"half a file")

    result = kbi("finetune", str(recipe), "--out", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["results"][0] == first["results"][0]  # not redone
    assert len(report["history"]["bias_injection"]["loss"]) < 3  # resumed after epoch 1, not from scratch
    assert [row["method"] for row in report["results"]][1:] == ["bias_injection", "bias_injection (control off)"]
    assert not (run / "backup" / "bias_injection").exists()  # removed once the method finished

    # Another recipe into the same folder is refused; the finished report stays as it was.
    before = (run / "report.json").read_text()
    result = kbi("finetune", str(recipe), "--out", str(run), "--set", "train.epochs=1")
    assert result.returncode == 2 and "holds the report of a different recipe" in result.stderr
    assert (run / "report.json").read_text() == before


@pytest.mark.slow
def test_generate_with_and_without_an_adapter(tmp_path):
    result = kbi("generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-length", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout
    result = kbi("generate", "smollm2-135m", "--prompt", "Hi", "--control", "1")
    assert result.returncode == 2 and "--control needs --adapter" in result.stderr


STEER = """
task = "causal_lm"
[model]
spec = "smollm2-135m"
sequence_length = 16
[data]
source = "small_fine_foods"
text_column = "review"
label_column = "label"
control_map = {{ great = 1.0, other = -1.0 }}
[inject]
rank = 2
[train]
methods = ["base", "bias_injection"]
epochs = 1
batch_size = 4
max_train_examples = 8
max_eval_examples = 4
[steer]
judge = "{judge}"
controls = [-1.0, 0.0, 1.0]
samples = 2
max_length = 12
"""


LOOP = STEER.replace('methods = ["base", "bias_injection"]', 'methods = ["base", "bias_injection", "feedback_head"]') + """
[feedback]
control_jitter = 1.0
"""


@pytest.fixture(scope="module")
def lm_run(classify_run, tmp_path_factory):
    """One finished SmolLM2 run that both steers and trains a feedback head (each costs minutes to start)."""
    judge, result = classify_run
    assert result.returncode == 0, result.stderr[-3000:]
    tmp_path = tmp_path_factory.mktemp("lm")
    recipe = tmp_path / "loop.toml"
    recipe.write_text(LOOP.format(judge=judge))
    run = tmp_path / "run"
    return run, kbi("finetune", str(recipe), "--out", str(run), timeout=1500)


@pytest.mark.slow
def test_lm_recipe_steers_and_its_neutral_control_is_the_base(lm_run):
    run, result = lm_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    rows = {row["method"]: row for row in report["results"]}
    assert {"base", "bias_injection"} <= set(rows) and rows["base"]["metric"] == "perplexity"
    assert rows["base"]["seconds"] < 60 and 1.0 < rows["base"]["value"] < 1e4  # zero-shot: no training
    assert rows["bias_injection"]["base_weights_unchanged"] is True
    steering = report["steering"]
    assert steering["controls"] == [-1.0, 0.0, 1.0] and len(steering["positive_share"]) == 3
    assert steering["neutral_equals_base"] is True  # gate "control": control 0 generates the base's text
    assert steering["positive_share"][1] == steering["base_positive_share"]
    assert (run / "steering.png").stat().st_size > 1000


@pytest.mark.slow
def test_loop_recipe_trains_a_head_and_kbi_loop_runs_a_session(lm_run, tmp_path):
    run, result = lm_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads((run / "report.json").read_text())["results"]}
    heads = [m for m in rows if m.startswith("feedback_head")]
    assert len(heads) == 3 and all(0.0 <= rows[m]["value"] <= 1.0 and rows[m]["trainable_params"] == 577 for m in heads)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["feedback_head"]["config"]["pooling"] == "last"
    result = kbi("loop", str(run), "--target", "0.7", "--turns", "2", "--prompts", "2", "--max-length", "12",
                 "--out", str(tmp_path / "trace.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    trace = json.loads((tmp_path / "trace.json").read_text())
    first, second = trace["turns"]
    assert trace["target"] == [pytest.approx(0.7)] and first["control"] == [0.0]  # a session starts neutral
    expected = 2.0 * (0.7 - first["reading"][0]) * 2 ** (-1 / 20)  # gain x error, one turn of a 20-turn half-life
    assert second["control"] == [pytest.approx(max(-1.5, min(1.5, expected)), abs=1e-5)]  # within max_norm
    assert (tmp_path / "trace.png").stat().st_size > 1000
    result = kbi("loop", str(run), "--target", "1.5", "--turns", "1")
    assert result.returncode == 2 and "inside the head's reading range (0.0, 1.0)" in result.stderr
