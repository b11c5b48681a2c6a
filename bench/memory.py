"""Peak memory of a training run: bias injection against full fine-tuning and KerasHub LoRA, each
in its own process (peak resident set size, which includes the TensorFlow runtime every method
pays alike), 3 rounds in alternating order, medians: glibc's heap makes single runs vary by tens of MB.
Beside the peak, the resident set after the first step (tracing the train function, the graph and
the first step's buffers) and after 5 steps. With it, `graph`: the traced training steps' op counts (`--graph-only` adds just that to an existing file).
Run: python bench/memory.py [--rounds 3] [--graph-only]  -> bench/results/memory.json"""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write  # noqa: E402

CHILD = """
import os, resource, sys, json
sys.path.insert(0, {bench!r})
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
from train_step import gpt2
from keras_biasinject import inject
method = sys.argv[1]
rng = np.random.default_rng(0)
x = {{"token_ids": rng.integers(1, 5000, (8, 128)).astype("int32"), "padding_mask": np.ones((8, 128), "int32")}}
y = rng.integers(1, 5000, (8, 128)).astype("int32")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = gpt2()
if method == "keras_lora":
    model.backbone.enable_lora(8)
elif method == "bias_injection":
    model = inject(model, rank=8)
    x["control"] = np.ones((8, 1), "float32")
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.train_on_batch(x, y)
first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(4):
    model.train_on_batch(x, y)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_model_mb": before / 1024,
                  "peak_after_first_step_mb": first / 1024}}))
"""


def graph_profile():
    """Where the difference comes from: each method's traced training step (forward and gradient, in one
    `tf.function` graph) counted in ops, and in outputs of at least batch x tokens x hidden elements, by
    op type, ours minus LoRA's."""
    import collections

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf
    from train_step import gpt2

    from keras_biasinject import inject

    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 5000, (8, 128)).astype("int32"), "padding_mask": np.ones((8, 128), "int32")}
    y = rng.integers(1, 5000, (8, 128)).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {}
    for method in ("keras_lora", "bias_injection"):
        model, inputs = gpt2(), dict(x)
        if method == "keras_lora":
            model.backbone.enable_lora(8)
        else:
            model, inputs["control"] = inject(model, rank=8), np.ones((8, 1), "float32")

        @tf.function
        def step(inputs, y, model=model):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(inputs, training=True))
            return tape.gradient(loss, model.trainable_variables)

        ops = step.get_concrete_function(inputs, y).graph.get_operations()
        big = collections.Counter(op.type for op in ops for t in op.outputs
                                  if t.shape.is_fully_defined() and t.shape.num_elements() >= 8 * 128 * 256)
        out[method] = {"ops": len(ops), "large_outputs": sum(big.values()), "large_by_type": dict(big)}
    ours, lora = out["bias_injection"]["large_by_type"], out["keras_lora"]["large_by_type"]
    out["large_outputs_ours_minus_lora"] = {k: ours.get(k, 0) - lora.get(k, 0) for k in set(ours) | set(lora)
                                            if ours.get(k, 0) != lora.get(k, 0)}
    return out


def main():
    import argparse
    import statistics

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--graph-only", action="store_true", help="only the graph profile, added to an existing memory.json")
    args = parser.parse_args()
    if args.graph_only:
        result = json.loads((Path(__file__).resolve().parent / "results" / "memory.json").read_text())
        write("memory", {**result, "graph": graph_profile()})
        return
    bench = os.path.dirname(os.path.abspath(__file__))
    methods = ["full", "keras_lora", "bias_injection"]
    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in (methods if r % 2 == 0 else methods[::-1]):
            out = subprocess.run([sys.executable, "-c", CHILD.format(bench=bench), method], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["training_mb"] = row["peak_rss_mb"] - row["rss_before_model_mb"]
            row["first_step_mb"] = row["peak_after_first_step_mb"] - row["rss_before_model_mb"]
            runs[method].append(row)
            print(method, row, flush=True)
    rows = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    write("memory", {"model": "GPT2 4 layers, hidden 256, vocab 5000", "batch": 8, "sequence_length": 128, "rounds": args.rounds,
                     "runs": rows, "all_runs": runs,
                     "ratio_training_mb_vs_full": rows["bias_injection"]["training_mb"] / rows["full"]["training_mb"],
                     "ratio_training_mb_vs_keras_lora": rows["bias_injection"]["training_mb"] / rows["keras_lora"]["training_mb"],
                     "goal_ratio_vs_keras_lora": 1.03, "graph": graph_profile()})


if __name__ == "__main__":
    main()
