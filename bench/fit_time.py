"""Whole-`fit` time for the demo recipe's configuration: bias injection against KerasHub LoRA, each fit in
a fresh process, in pairs that alternate which goes first (so machine noise and warm file caches hit
both alike).

Each child loads a fresh MiniLM classifier, prepares the method exactly as `kbi finetune` does (rank 8
on query/value, the head trains, the recipe's optimizer and schedule), and runs `model.fit` on the
recipe's tokenized training split with validation. It reports the seconds to the end of the first
step (tracing and graph building included), the whole fit, the mean of the steady steps (every step
after the first 5), how often Keras traced its train and test functions (a retrace on the control's
shape or dtype would show here), the CPU seconds of the fit (which another tenant's load on the machine
does not inflate as it does wall time), the validation passes, and every pause of over 1.5 s between
callback events ("stalls": those of over 5 s other than the first step).
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
    from keras_biasinject.rewrite.injected_model import InjectedModel, build_optimizer
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
    build_optimizer(model)  # as `kbi finetune` does for every method: the train step traced once
    prepared = time.perf_counter()

    class Steps(keras.callbacks.Callback):
        """Times each training step, each validation pass and what `fit` does between them."""
        ends, validation, events = [], [], []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.events.append(("train_batch_end", self.ends[-1]))

        def on_test_begin(self, logs=None):
            self.validation.append([time.perf_counter(), None])
            self.events.append(("test_begin", self.validation[-1][0]))

        def on_test_end(self, logs=None):
            self.validation[-1][1] = time.perf_counter()
            self.events.append(("test_end", self.validation[-1][1]))

        def on_test_batch_end(self, batch, logs=None):
            self.events.append(("test_batch_end", time.perf_counter()))

        def on_epoch_begin(self, epoch, logs=None):
            self.events.append(("epoch_begin", time.perf_counter()))

        def on_epoch_end(self, epoch, logs=None):
            self.events.append(("epoch_end", time.perf_counter()))

        def on_train_end(self, logs=None):
            self.events.append(("train_end", time.perf_counter()))

    traces = {"train": 0, "test": 0}  # a step's Python body runs only while tf.function traces it

    def counted(kind, step):
        def run(data):
            traces[kind] += 1
            return step(data)
        return run

    model.train_step, model.test_step = counted("train", model.train_step), counted("test", model.test_step)
    with preprocessor_detached(model):
        fit_start, cpu_start = time.perf_counter(), time.process_time()
        model.fit(data["train"], validation_data=data["validation"], epochs=recipe.train.epochs, verbose=0, callbacks=[Steps()])
        fit_end, cpu_s = time.perf_counter(), time.process_time() - cpu_start
    timeline = [("fit_start", fit_start)] + Steps.events + [("fit_end", fit_end)]
    slow = [[a[0], b[0], b[1] - a[1]] for a, b in zip(timeline, timeline[1:]) if b[1] - a[1] > 1.5]  # gaps over 1.5 s
    ends = Steps.ends
    steady = [b - a for a, b in zip(ends[5:], ends[6:])]
    between = sum(b - a for a, b in Steps.validation if b < ends[-1])  # validation passes between epochs
    steps_s = ends[-1] - fit_start - between  # every train step, the first included, and the epoch ends between them
    print(json.dumps({
        "method": method, "prepare_s": prepared - start, "first_step_s": ends[0] - fit_start, "fit_s": fit_end - fit_start, "fit_cpu_s": cpu_s,
        "steady_step_ms": 1000 * statistics.mean(steady), "steps": len(ends),
        "train_traces": traces["train"], "test_traces": traces["test"],
        "validation_s": [b - a for a, b in Steps.validation], "steps_s": steps_s,
        "gaps_over_1_5_s": slow, "after_last_step_s": fit_end - ends[-1] - (Steps.validation[-1][1] - Steps.validation[-1][0]),
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
    write("fit_time", summarize(runs, args.train, args.pairs))


def stalls_of(run):
    """The pauses of over 5 s in a run other than its first step (which traces the train function)."""
    gaps = run["gaps_over_1_5_s"]
    first = next((i for i, g in enumerate(gaps) if g[:2] == ["epoch_begin", "train_batch_end"]), None)  # None: a first step under 1.5 s
    return [g for i, g in enumerate(gaps) if i != first and g[2] > 5]


def summarize(runs, train, pairs):
    """The results file's content from each method's runs (one dict per fresh process)."""
    keys = ("prepare_s", "first_step_s", "fit_s", "fit_cpu_s", "steady_step_ms", "after_last_step_s")
    median = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    ratios = [o["fit_s"] / l["fit_s"] for o, l in zip(runs["bias_injection"], runs["keras_lora"])]
    cpu = [o["fit_cpu_s"] / l["fit_cpu_s"] for o, l in zip(runs["bias_injection"], runs["keras_lora"])]
    stalls = {m: [stalls_of(r) for r in rs] for m, rs in runs.items()}
    return {
        "recipe": "recipes/classify_fine_foods.toml", "train_examples": train, "pairs": pairs, "runs": runs,
        "median": median, "fit_ratio_per_pair": ratios, "fit_ratio_median": statistics.median(ratios),
        "fit_cpu_ratio_per_pair": cpu, "fit_cpu_ratio_median": statistics.median(cpu), "stalls": stalls,
        "first_step_ratio": median["bias_injection"]["first_step_s"] / median["keras_lora"]["first_step_s"],
        "steady_step_ratio": median["bias_injection"]["steady_step_ms"] / median["keras_lora"]["steady_step_ms"],
        "goal_fit_ratio": GOAL, **device(),
    }


if __name__ == "__main__":
    main()
