"""The README's "Backends" section, rendered from measured results (results.json beside this file).

tests/test_backends.py measures every backend and compares with results.json; with KBI_RECORD_BACKENDS=1
it writes what it measured there and re-renders the README section instead:

    KBI_RECORD_BACKENDS=1 python -m pytest tests/test_backends.py -p no:cacheprovider

`python -m tests.backend_suite.readme` re-renders the section from results.json alone.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).with_name("results.json")
README = ROOT / "README.md"
START, END = "<!-- backends -->", "<!-- /backends -->"
BACKENDS = ("tensorflow", "jax", "torch")
# row key in results.json -> the README's words for it
ROWS = {
    "layers": "layer suite (`tests/layers`)",
    "GPT2": "GPT-2: `inject` exact, `fit`, `.keras` round trip, `generate`",
    "BERT": "BERT: `inject` exact, `fit`, `.keras` round trip",
    "Llama": "Llama: `inject` exact, `fit`, `.keras` round trip, `generate`",
    "model-parallel": "`--strategy model-parallel`",
    "finetune": "`kbi finetune` (MiniLM recipe)",
    "finetune model-parallel": "`kbi finetune --strategy model-parallel`",
}


def read_results():
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def record(key, backend, cell):
    """Stores one measured cell ({"outcome": ..., "note": ...}) in results.json and re-renders the README."""
    results = read_results()
    results.setdefault(key, {})[backend] = cell
    RESULTS.write_text(json.dumps({k: results[k] for k in ROWS if k in results}, indent=2, sort_keys=False) + "\n")
    write_readme()


def _cell(cell):
    if cell is None:
        return "not measured"
    return cell["outcome"] + (f" ({cell['note']})" if cell.get("note") else "")


def render(results):
    """The section's text between the markers (markers excluded)."""
    lines = [
        "",
        "## Backends",
        "",
        "Measured by `tests/test_backends.py` (one pytest process per `KERAS_BACKEND`; the `kbi finetune` runs are",
        "the same recipe and command with only the backend changed). Generated from",
        "`tests/backend_suite/results.json`; do not edit by hand, re-record instead:",
        "`KBI_RECORD_BACKENDS=1 python -m pytest tests/test_backends.py`.",
        "",
        "| | " + " | ".join(BACKENDS) + " |",
        "|---|" + "---|" * len(BACKENDS),
    ]
    for key, words in ROWS.items():
        row = results.get(key, {})
        lines.append(f"| {words} | " + " | ".join(_cell(row.get(b)) for b in BACKENDS) + " |")
    lines += [
        "",
        "`kbi finetune` on JAX is compared with TensorFlow on the same recipe (real MiniLM, 32 reviews, 2 epochs of",
        "4 steps, dropout 0): every loss in the report within 0.03 and every accuracy within 3 examples. Not",
        "tighter, because the two backends draw the random start of the classifier head and of the adapters'",
        "`A` matrices from different generators for the same seed (TensorFlow: Philox, JAX: Threefry); the",
        "pretrained weights, the data order (tf.data, same seed) and everything else are the same. 0.03 is",
        "below what training moves the loss in these 8 steps, so a backend that does not train fails. The",
        "model-parallel run (2 x 2 mesh over 4 JAX host devices) starts from the same draws as the one-device",
        "JAX run and matches it within 1e-5 (float32 sums in another order).",
        "",
    ]
    return "\n".join(lines)


def readme_section(text):
    """The text between the markers in `text`, or None when the markers are missing."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0]


def write_readme():
    text = README.read_text()
    section = readme_section(text)
    if section is None:
        raise ValueError(f"README.md has no {START} ... {END} markers; add them where the Backends section goes.")
    README.write_text(text.replace(START + section + END, START + render(read_results()) + END))


if __name__ == "__main__":
    write_readme()
