"""Every Keras backend, measured: the README's "Backends" section is rendered from what these tests record.

Keras fixes its backend at import, so each backend is one pytest process (KERAS_BACKEND=...) that runs
tests/layers, tests/backend_suite/families.py (inject on GPT-2, BERT and Llama: exact, fit, .keras,
generate) and tests/backend_suite/strategy.py (--strategy model-parallel: sharded on JAX, refused
elsewhere). JAX gets 4 host devices (XLA_FLAGS) so that model-parallel has a real 2 x 2 mesh.

`kbi finetune` runs one small real recipe (MiniLM, 32 reviews, 2 epochs of 4 steps, dropout 0) three
times: TensorFlow, JAX, and JAX with --strategy model-parallel. Tolerances:
- JAX vs TensorFlow: losses within 0.03, accuracies within 3 examples. The backends draw the head's
  and the adapters' random initial weights from different generators (Philox vs Threefry) for the
  same seed, so the runs start from different points. Measured: losses differ by 2.2e-2 at most
  and accuracies by 3 of 32 training examples, both in the first epoch, with the MiniLM classifier
  reading mean-pooled tokens (its checkpoint's pooling); with the earlier [CLS] head it was 4e-3 and
  2 examples. The mean-pooled head learns faster from the first step, so the different starts show
  more before the runs converge (epoch 2: 1.2e-2). The test also requires the loss to fall by more
  than twice the tolerance in these 8 steps, so a backend that does not train, or trains wrongly,
  fails.
- model-parallel vs one-device JAX: 1e-5. Same initial draws, same batches; the sharded matmuls only
  sum their float32 partial products in another order (measured: 6e-8).

Each measured cell must equal tests/backend_suite/results.json; KBI_RECORD_BACKENDS=1 records instead.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.backend_suite import readme

ROOT = Path(__file__).resolve().parents[1]
RECORD = os.environ.get("KBI_RECORD_BACKENDS") == "1"
SUITE = ["tests/layers", "tests/backend_suite/families.py", "tests/backend_suite/strategy.py"]
FAMILIES = ("GPT2", "BERT", "Llama")
RECIPE = """
task = "classification"
[model]
spec = "minilm-l6"
sequence_length = 16
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
"""
LOSS_TOLERANCE = 0.03  # JAX vs TensorFlow: different random starts for the head and adapters (see above)
ACCURACY_EXAMPLES = 3  # ... accuracies may differ by this many examples
SHARDED_TOLERANCE = 1e-5  # model-parallel vs one-device JAX: float32 sums in another order


def _env(backend, home):
    env = {**os.environ, "KERAS_BACKEND": backend, "KERAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend == "jax":  # before JAX starts: 4 CPU devices, a 2 x 2 (batch, model) mesh for model-parallel
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    return env


def _outcomes(junit):
    """[(file, test name, "passed" | "failed" | "skipped")] from a pytest JUnit XML file."""
    rows = []
    for case in ElementTree.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        rows.append((case.get("classname", ""), case.get("name", ""), outcome))
    return rows


def _cell(rows, passed_note=""):
    failed = [name for _, name, outcome in rows if outcome == "failed"]
    ran = [r for r in rows if r[2] != "skipped"]
    if not ran:
        return {"outcome": "not applicable"}
    if failed:
        return {"outcome": "failed", "note": f"{len(failed)} of {len(ran)}: " + ", ".join(failed[:3])}
    return {"outcome": "passed", "note": passed_note}


def _check(key, backend, cell):
    """Records the cell (KBI_RECORD_BACKENDS=1) or requires that it equals the recorded one."""
    if RECORD:
        readme.record(key, backend, cell)
        return
    recorded = readme.read_results().get(key, {}).get(backend)
    assert recorded == cell, (
        f"{key} on {backend}: measured {cell}, README/results.json say {recorded}. Re-record: KBI_RECORD_BACKENDS=1 "
        "python -m pytest tests/test_backends.py"
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", readme.BACKENDS)
def test_layers_inject_fit_save_and_generate_on_each_backend(backend, tmp_path):
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=ROOT, env=_env(backend, tmp_path), capture_output=True, text=True, timeout=1200,
    )
    assert junit.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    rows = _outcomes(junit)
    layers = [r for r in rows if r[0].startswith("tests.layers.")]
    assert len(layers) >= 60, f"only {len(layers)} layer tests ran: " + run.stdout[-3000:]
    cells = {"layers": _cell(layers, f"{len(layers)} tests")}
    for family in FAMILIES:
        cells[family] = _cell([r for r in rows if r[0].endswith("families") and r[1].endswith(f"[{family}]")])
    strategy = [r for r in rows if r[0].endswith("backend_suite.strategy")]
    cell = _cell(strategy, "2 x 2 mesh over 4 host devices, weights sharded" if backend == "jax" else "")
    if backend != "jax" and cell["outcome"] == "passed":  # what passed there is the refusal
        cell = {"outcome": "refused", "note": "ValueError naming the argument and the fix"}
    cells["model-parallel"] = cell
    if backend != "jax":  # the kbi refusal; JAX runs the command for real below
        cells["finetune model-parallel"] = dict(cell, note="`kbi finetune` exits 2 with that error, writes nothing")
    for key, cell in cells.items():
        _check(key, backend, cell)
    assert run.returncode == 0, f"{backend}: {json.dumps(cells, indent=1)}\n" + run.stdout[-6000:] + run.stderr[-2000:]


def _finetune(tmp_path_factory, backend, *strategy):
    folder = tmp_path_factory.mktemp(f"finetune-{backend}")
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE)
    run = subprocess.run(
        [sys.executable, "-m", "keras_biasinject.cli.main", "finetune", str(recipe), "--out", str(folder / "run"), *strategy],
        cwd=ROOT, env=_env(backend, folder), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, f"{backend} {strategy}: " + run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((folder / "run" / "report.json").read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return {
        "tensorflow": _finetune(tmp_path_factory, "tensorflow"),
        "jax": _finetune(tmp_path_factory, "jax"),
        "jax model-parallel": _finetune(tmp_path_factory, "jax", "--strategy", "model-parallel"),
    }


def _differences(report, reference):
    """{name: |report - reference|} for every number of the two reports (results and history)."""
    assert [r["method"] for r in report["results"]] == [r["method"] for r in reference["results"]]
    assert [r["trainable_params"] for r in report["results"]] == [r["trainable_params"] for r in reference["results"]]
    out = {f"result {r['method']}": abs(r["value"] - s["value"]) for r, s in zip(report["results"], reference["results"])}
    for method, history in reference["history"].items():
        assert sorted(report["history"][method]) == sorted(history)
        for key, values in history.items():
            assert len(report["history"][method][key]) == len(values), key
            for epoch, (a, b) in enumerate(zip(report["history"][method][key], values)):
                out[f"{method} {key} epoch {epoch + 1}"] = abs(a - b)
    return out


@pytest.mark.slow
def test_kbi_finetune_on_jax_matches_tensorflow(reports):
    tf_report, jax_report = reports["tensorflow"], reports["jax"]
    differences = _differences(jax_report, tf_report)
    print(f"\nJAX vs TensorFlow: {json.dumps(differences, indent=1)}")
    for name, difference in differences.items():
        if "loss" in name:
            assert difference <= LOSS_TOLERANCE, (name, difference)
        else:  # accuracies: the results are on 16 test reviews, the history on 32 training / 16 validation ones
            examples = 32 if " accuracy epoch" in name else 16  # "... val_accuracy epoch 1" and results: 16
            assert difference <= ACCURACY_EXAMPLES / examples + 1e-9, (name, difference)
    for report in (tf_report, jax_report):  # both trained, by more than the tolerance
        losses = report["history"]["bias_injection"]["loss"]
        assert losses[0] - losses[-1] > 2 * LOSS_TOLERANCE, losses
    worst = max(d for n, d in differences.items() if "loss" in n)
    _check("finetune", "tensorflow", {"outcome": "passed", "note": "the reference"})
    print(f"worst loss difference: {worst:.1e}")  # measured 2.2e-2 on 2 CPU cores; the cell states the tolerance only
    _check("finetune", "jax", {"outcome": "passed", "note": "matches TensorFlow: losses within 0.03, accuracies within 3 examples"})


@pytest.mark.slow
def test_kbi_finetune_model_parallel_matches_the_one_device_jax_run(reports):
    differences = _differences(reports["jax model-parallel"], reports["jax"])
    worst = max(differences.values())
    assert worst <= SHARDED_TOLERANCE, differences
    print(f"worst difference from one device: {worst:.1e}")  # measured 6e-8
    _check("finetune model-parallel", "jax", {"outcome": "passed", "note": "2 x 2 mesh; equals one device within 1e-5"})


def test_readme_backends_section_is_the_recorded_measurements():
    section = readme.readme_section(readme.README.read_text())
    assert section is not None, f"README.md lacks the {readme.START} / {readme.END} markers"
    assert section == readme.render(readme.read_results()), "README's Backends section is stale: python -m tests.backend_suite.readme"
    results = readme.read_results()
    assert sorted(results) == sorted(readme.ROWS) and all(set(row) <= set(readme.BACKENDS) for row in results.values())
