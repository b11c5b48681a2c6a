"""Training on an int8 base: the demo recipe (MiniLM on 1,024 Fine Foods reviews, 2 epochs) with its
backbone in Keras' int8 (`[model] quantize = "int8"`), against the same recipe in float32.

Each run is a fresh process: the recipe's model, data, optimizer and `fit`, exactly as `kbi finetune`
prepares them, then accuracy on the recipe's 512 test reviews. Memory is the peak resident set during
`fit` (the kernel's high-water mark, reset just before `fit`) above the resident set before the model
was loaded: weights, optimizer state, activations and the traced graphs. Resetting it before `fit`
leaves out the float32 weights an int8 run holds for a moment while `quantize` converts them (a saved
int8 model loads without them).

Methods: float32 KerasHub LoRA (the reference of the goals), int8 KerasHub LoRA (the QLoRA-style
control group) and int8 bias injection. Goals: int8 bias injection at most 0.6x the float32 LoRA run's
memory, and accuracy within 1 point (mean over seeds).
Run: python bench/quantized_training.py [--seeds 0 1]  -> bench/results/quantized_training.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import wilson  # noqa: E402
from timing import device, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "classify_fine_foods.toml")
RUNS = {  # name -> (method, [model] quantize)
    "keras_lora fp32": ("keras_lora", None),
    "keras_lora int8": ("keras_lora", "int8"),
    "bias_injection int8": ("bias_injection", "int8"),
}
GOALS = {"memory_vs_fp32_lora": 0.6, "accuracy_points_vs_fp32_lora": 1.0}


def _rss_mb(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name, seed):
    """One run in this process; prints one JSON line."""
    import ctypes
    import gc
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from keras_biasinject.recipes import load_recipe
    from keras_biasinject.recipes.datasets import compile_for_recipe, score, split_dataset
    from keras_biasinject.recipes.finetune import _optimizer, _prepared_model
    from keras_biasinject.rewrite.injected_model import InjectedModel
    from keras_biasinject.rewrite.kerashub import preprocessor_detached

    method, quantize = RUNS[name]
    overrides = [("train.methods", [method]), ("train.seed", seed)] + ([("model.quantize", quantize)] if quantize else [])
    recipe = load_recipe(RECIPE, overrides)
    keras.utils.set_random_seed(seed)
    before = _rss_mb("VmRSS")
    model = _prepared_model(recipe, method, tf.distribute.get_strategy())
    injected = isinstance(model, InjectedModel)
    data = {s: split_dataset(recipe, s, model.preprocessor, injected, shuffle=s == "train") for s in ("train", "validation", "test")}
    steps = int(data["train"].cardinality().numpy()) * recipe.train.epochs
    compile_for_recipe(model, _optimizer(recipe, steps, method))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap (the float32 weights `quantize` replaced) back
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    start_rss = _rss_mb("VmRSS")
    with preprocessor_detached(model):
        start = time.perf_counter()
        model.fit(data["train"], validation_data=data["validation"], epochs=recipe.train.epochs, verbose=0)
        seconds = time.perf_counter() - start
        peak = _rss_mb("VmHWM")
        _, accuracy = score(model, recipe, data["test"])
    weights_mb = sum(v.numpy().nbytes for v in model.weights) / 2**20
    print(json.dumps({"run": name, "seed": seed, "accuracy": accuracy, "test_examples": 512, "fit_s": seconds,
                      "rss_before_model_mb": before, "rss_at_fit_start_mb": start_rss, "peak_during_fit_mb": peak,
                      "training_mb": peak - before, "weights_mb": weights_mb}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="an int8 run takes about 7 minutes on 2 cores")
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.seed)
    runs = {name: [] for name in RUNS}
    for i, seed in enumerate(args.seeds):
        names = list(RUNS)
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order from seed to seed
            out = subprocess.run([sys.executable, __file__, "--child", name, "--seed", str(seed)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[name][-1], flush=True)
    summary = {}
    for name, rs in runs.items():
        accuracy = statistics.mean(r["accuracy"] for r in rs)
        summary[name] = {
            "accuracy_mean": accuracy, "accuracy_std": statistics.pstdev(r["accuracy"] for r in rs),
            "accuracy_wilson_95_seed_pool": wilson(accuracy, 512 * len(rs)),
            "training_mb_median": statistics.median(r["training_mb"] for r in rs),
            "weights_mb": rs[0]["weights_mb"], "fit_s_median": statistics.median(r["fit_s"] for r in rs),
        }
    reference, ours = summary["keras_lora fp32"], summary["bias_injection int8"]
    write("quantized_training", {
        "recipe": "recipes/classify_fine_foods.toml", "seeds": args.seeds, "runs": runs, "summary": summary,
        "memory_vs_fp32_lora": ours["training_mb_median"] / reference["training_mb_median"],
        "accuracy_points_vs_fp32_lora": 100 * (ours["accuracy_mean"] - reference["accuracy_mean"]),
        "goals": GOALS, **device(),
    })


if __name__ == "__main__":
    main()
