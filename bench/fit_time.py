"""Whole-`fit` time for the demo recipe's configuration: bias injection against KerasHub LoRA, each fit in
a fresh process, in pairs that alternate which goes first (so machine noise and warm file caches hit
both alike).

Each child loads a fresh MiniLM classifier, prepares the method exactly as `kbi finetune` does (rank 8
on query/value, the head trains, the recipe's optimizer and schedule), and runs `model.fit` on the
recipe's tokenized training split with validation. It reports the seconds to the end of the first
step (tracing and graph building included), the whole fit, the mean of the steady steps (every step
after the first 5), and how often Keras traced its train and test functions (a retrace on the control's
shape or dtype would show here).
Run: python bench/fit_time.py [--pairs 3] [--train 1024]  -> bench/results/fit_time.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import device, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("keras_lora", "bias_injection")
GOAL = 1.05  # whole fit, ours / LoRA


def child(method, train):
    """One fit in this process; prints one JSON line."""
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from keras_biasinject.recipes import load_recipe
    from keras_biasinject.recipes.datasets import compile_for_recipe, split_dataset
    from keras_biasinject.recipes.finetune import _optimizer, _prepared_model
    from keras_biasinject.rewrite.injected_model import InjectedModel
    from keras_biasinject.rewrite.kerashub import preprocessor_detached
    import tensorflow as tf

    recipe = load_recipe(os.path.join(ROOT, "recipes", "classify_fine_foods.toml"),
                         [("train.methods", [method]), ("train.max_train_examples", train)])
    keras.utils.set_random_seed(recipe.train.seed)
    start = time.perf_counter()
    model = _prepared_model(recipe, method, tf.distribute.get_strategy())
    injected = isinstance(model, InjectedModel)
    data = {s: split_dataset(recipe, s, model.preprocessor, injected, shuffle=s == "train") for s in ("train", "validation")}
    steps = int(data["train"].cardinality().numpy()) * recipe.train.epochs
    compile_for_recipe(model, _optimizer(recipe, steps, method))
    prepared = time.perf_counter()

    class Steps(keras.callbacks.Callback):
        ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    traces = {"train": 0, "test": 0}  # a step's Python body runs only while tf.function traces it

    def counted(kind, step):
        def run(data):
            traces[kind] += 1
            return step(data)
        return run

    model.train_step, model.test_step = counted("train", model.train_step), counted("test", model.test_step)
    with preprocessor_detached(model):
        fit_start = time.perf_counter()
        model.fit(data["train"], validation_data=data["validation"], epochs=recipe.train.epochs, verbose=0, callbacks=[Steps()])
        fit_end = time.perf_counter()
    ends = Steps.ends
    steady = [b - a for a, b in zip(ends[5:], ends[6:])]
    print(json.dumps({
        "method": method, "prepare_s": prepared - start, "first_step_s": ends[0] - fit_start, "fit_s": fit_end - fit_start,
        "steady_step_ms": 1000 * statistics.mean(steady), "steps": len(ends),
        "train_traces": traces["train"], "test_traces": traces["test"],
    }))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--train", type=int, default=1024, help="training reviews (the demo's 1,024)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.train)
    runs = {m: [] for m in METHODS}
    for pair in range(args.pairs):
        order = METHODS if pair % 2 == 0 else METHODS[::-1]
        for method in order:
            out = subprocess.run([sys.executable, __file__, "--child", method, "--train", str(args.train)],
                                 capture_output=True, text=True, check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(pair, runs[method][-1], flush=True)
    median = {m: {k: statistics.median(r[k] for r in rs) for k in ("prepare_s", "first_step_s", "fit_s", "steady_step_ms")}
              for m, rs in runs.items()}
    ratios = [o["fit_s"] / l["fit_s"] for o, l in zip(runs["bias_injection"], runs["keras_lora"])]
    write("fit_time", {
        "recipe": "recipes/classify_fine_foods.toml", "train_examples": args.train, "pairs": args.pairs, "runs": runs,
        "median": median, "fit_ratio_per_pair": ratios, "fit_ratio_median": statistics.median(ratios),
        "first_step_ratio": median["bias_injection"]["first_step_s"] / median["keras_lora"]["first_step_s"],
        "steady_step_ratio": median["bias_injection"]["steady_step_ms"] / median["keras_lora"]["steady_step_ms"],
        "goal_fit_ratio": GOAL, **device(),
    })


if __name__ == "__main__":
    main()
