"""Forward latency: the injected model with a dynamic control (unmerged), the same merged for one
control, and the base model, side by side. Run: python bench/inference.py

Writes bench/results/inference.json with ratio_unmerged_vs_base (goal <= 1.10) and
ratio_merged_vs_base (goal <= 1.01).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import device, interleaved, summary, write  # noqa: E402
from train_step import gpt2  # noqa: E402

from keras_biasinject import inject, merge  # noqa: E402


def main():
    batch, seq = 8, 128
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 5000, (batch, seq)).astype("int32"), "padding_mask": np.ones((batch, seq), "int32")}
    base = gpt2()
    injected = inject(gpt2(), rank=8)
    for v in injected.trainable_weights:  # trained-looking adapters: non-zero everywhere
        v.assign(rng.normal(scale=0.02, size=v.shape).astype("float32"))
    c = np.full((batch, 1), 0.7, "float32")
    merged = merge(injected, [0.7])
    np.testing.assert_allclose(merged.predict_on_batch(x), injected.predict_on_batch({**x, "control": c}), atol=1e-4)
    fns = {
        "base": lambda: base.predict_on_batch(x),
        "unmerged": lambda: injected.predict_on_batch({**x, "control": c}),
        "merged": lambda: merged.predict_on_batch(x),
    }
    times = summary(interleaved(fns, rounds=60, warmup=5))
    write("inference", {
        "model": "GPT2 4 layers, hidden 256, vocab 5000", "batch": batch, "sequence_length": seq, "rank": 8,
        "forward": times,
        "ratio_unmerged_vs_base": times["unmerged"]["median_ms"] / times["base"]["median_ms"],
        "ratio_merged_vs_base": times["merged"]["median_ms"] / times["base"]["median_ms"],
        "goals": {"ratio_unmerged_vs_base": 1.10, "ratio_merged_vs_base": 1.01},
        **device(),
    })


if __name__ == "__main__":
    main()
