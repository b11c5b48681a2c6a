"""Peak memory of a training run: bias injection against full fine-tuning and KerasHub LoRA, each
in its own process (peak resident set size, which includes the TensorFlow runtime every method
pays alike), 3 rounds in alternating order, medians: glibc's heap makes single runs vary by tens of MB.
Beside the peak, the resident set after the first step (tracing the train function, the graph and
the first step's buffers) and after 5 steps. With it, `graph`: the traced training steps' op counts (`--graph-only` adds just that to an existing file).
`--smollm2`: SmolLM2-135M instead (-> memory_smollm2.json): training at batch 4 x 32 (ours against KerasHub
LoRA), and inference, `generate` at batch 1 with 64 new tokens (the base; ours unmerged with a control;
ours merged). Loading converts the checkpoint, which for a moment needs more memory than anything after
it, so there the high-water mark is reset (`/proc/self/clear_refs`) once the model is ready, and the
figure is the peak after that above the resident set before loading: weights, optimizer, activations.
With it, `trace` (`--smollm2 --trace-only` adds just that): a training step's graph, its op count and the memory
that tracing it and running it first add (`trace_profile`).
"keras_lora built" is KerasHub's LoRA with the optimizer built by hand before the first step, which ours
does itself (`build_optimizer`): Keras otherwise builds it inside the first trace of the train step, and
TensorFlow then traces the step twice and keeps both graphs. It is the strongest LoRA run, and the goal's
reference; plain "keras_lora" is LoRA as its users run it.
Run: python bench/memory.py [--rounds 3] [--graph-only | --smollm2]  -> bench/results/memory.json"""

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
if method.startswith("keras_lora"):
    model.backbone.enable_lora(8)
elif method == "bias_injection":
    model = inject(model, rank=8)
    x["control"] = np.ones((8, 1), "float32")
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
if method == "keras_lora built":  # by hand, what ours does itself (`build_optimizer`): one trace of the step
    model.optimizer.build(model.trainable_variables)
model.train_on_batch(x, y)
first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(4):
    model.train_on_batch(x, y)
with open("/proc/self/status") as status:  # what stays resident between steps: weights, optimizer, graphs, freed heap
    now = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_model_mb": before / 1024,
                  "peak_after_first_step_mb": first / 1024, "rss_after_steps_mb": now}}))
"""

SMOLLM2_CHILD = """
import ctypes, gc, os, sys, json
sys.path.insert(0, {bench!r})
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
from keras_biasinject import inject, load, merge

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))

method = sys.argv[1]
before = rss("VmRSS")
lm = load("smollm2-135m", task="causal_lm", sequence_length=128)
if method.startswith("keras_lora"):
    lm.backbone.enable_lora(8)
elif method != "base":
    lm = inject(lm, rank=8)
    rng = np.random.default_rng(0)
    for v in lm.trainable_weights:  # trained-looking adapters (V zero, as in bench/generation.py, so that it merges)
        v.assign(np.zeros(v.shape, "float32") if v.path.endswith("control_kernel") else rng.normal(scale=0.02, size=v.shape).astype("float32"))
    if method == "bias_injection merged":
        lm = merge(lm, [0.7])
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the high-water mark restarts from the resident set now
ready = rss("VmRSS")
if {train}:
    rng = np.random.default_rng(0)
    lm.preprocessor = None
    x = {{"token_ids": rng.integers(1, 49152, (4, 32)).astype("int32"), "padding_mask": np.ones((4, 32), "int32")}}
    if method == "bias_injection":
        x["control"] = np.ones((4, 1), "float32")
    y = rng.integers(1, 49152, (4, 32)).astype("int32")
    lm.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if method == "keras_lora built":  # by hand, what ours does itself (`build_optimizer`): one trace of the step
        lm.optimizer.build(lm.trainable_variables)
    for _ in range(5):
        lm.train_on_batch(x, y)
else:
    for _ in range(2):
        if method == "bias_injection":
            lm.generate("This tea is", max_length=68, stop_token_ids=None, control=[0.7])
        else:
            lm.generate("This tea is", max_length=68, stop_token_ids=None)
print(json.dumps({{"rss_before_model_mb": before, "rss_model_ready_mb": ready, "peak_after_ready_mb": rss("VmHWM")}}))
"""

TRACE_CHILD = """
import ctypes, gc, os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np, tensorflow as tf
from keras_biasinject import inject, load

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))

method = sys.argv[1]
lm = load("smollm2-135m", task="causal_lm", sequence_length=128)
lm.preprocessor = None
rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(1, 49152, (4, 32)).astype("int32"), "padding_mask": np.ones((4, 32), "int32")}
y = rng.integers(1, 49152, (4, 32)).astype("int32")
if method == "keras_lora":
    lm.backbone.enable_lora(8)
else:
    lm, x["control"] = inject(lm, rank=8), np.ones((4, 1), "float32")
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
optimizer = keras.optimizers.Adam(1e-4)
optimizer.build(lm.trainable_variables)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
start = rss()

@tf.function
def step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, lm(x, training=True))
    optimizer.apply(tape.gradient(loss, lm.trainable_variables), lm.trainable_variables)
    return loss

graph = step.get_concrete_function(x, y).graph
traced = rss()
step(x, y)
first = rss()
for _ in range(3):
    step(x, y)

def part(op):  # by the name scope that made it
    name = op.name.lower()
    return "optimizer" if "adam" in name or "optimizer" in name else "gradient" if name.startswith("gradient_tape") else "forward"

parts = {}
for op in graph.get_operations():
    parts[part(op)] = parts.get(part(op), 0) + 1
adapters = sum(v.path.endswith(("lora_a", "lora_kernel_a")) for v in lm.trainable_variables)
print(json.dumps({"ops": len(graph.get_operations()), "ops_by_part": parts, "adapters": adapters,
                  "trainable_variables": len(lm.trainable_variables), "tracing_mb": traced - start,
                  "first_run_mb": first - traced, "after_4_steps_mb": rss() - start}))
"""


def trace_profile():
    """Where SmolLM2's training memory goes: one `tf.function` training step (forward, gradient, Adam) per method,
    in fresh processes: its op count (in all, and by the part that made each op), the resident set that tracing
    alone adds (the graph), what the first run adds (graph optimisation, kernels, buffers), and the total after
    4 steps; `more_ops_per_adapter`: ours minus LoRA's, by part, per adapter."""
    out = {}
    for method in ("keras_lora", "bias_injection"):
        done = subprocess.run([sys.executable, "-c", TRACE_CHILD, method], capture_output=True, text=True, check=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(method, out[method], flush=True)
    ours, lora = out["bias_injection"], out["keras_lora"]
    out["more_ops_per_adapter"] = {part: (ours["ops_by_part"][part] - lora["ops_by_part"].get(part, 0)) / ours["adapters"]
                                   for part in ours["ops_by_part"]}
    return out


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
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M training and inference -> memory_smollm2.json")
    parser.add_argument("--trace-only", action="store_true", help="with --smollm2: only the tracing profile, added to the file")
    args = parser.parse_args()
    if args.smollm2 and args.trace_only:
        result = json.loads((Path(__file__).resolve().parent / "results" / "memory_smollm2.json").read_text())
        return write("memory_smollm2", {**smollm2_summary(result["all_runs"], result["rounds"]), "trace": trace_profile()})
    if args.smollm2:
        return smollm2(args.rounds)
    if args.graph_only:
        result = json.loads((Path(__file__).resolve().parent / "results" / "memory.json").read_text())
        write("memory", {**result, "graph": graph_profile()})
        return
    bench = os.path.dirname(os.path.abspath(__file__))
    methods = ["full", "keras_lora", "keras_lora built", "bias_injection"]
    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in (methods if r % 2 == 0 else methods[::-1]):
            out = subprocess.run([sys.executable, "-c", CHILD.format(bench=bench), method], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["training_mb"] = row["peak_rss_mb"] - row["rss_before_model_mb"]
            row["first_step_mb"] = row["peak_after_first_step_mb"] - row["rss_before_model_mb"]
            row["resident_after_steps_mb"] = row["rss_after_steps_mb"] - row["rss_before_model_mb"]
            runs[method].append(row)
            print(method, row, flush=True)
    rows = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    write("memory", {"model": "GPT2 4 layers, hidden 256, vocab 5000", "batch": 8, "sequence_length": 128, "rounds": args.rounds,
                     "runs": rows, "all_runs": runs,
                     "ratio_training_mb_vs_full": rows["bias_injection"]["training_mb"] / rows["full"]["training_mb"],
                     "ratio_training_mb_vs_keras_lora": rows["bias_injection"]["training_mb"] / rows["keras_lora"]["training_mb"],
                     "ratio_training_mb_vs_keras_lora_built": rows["bias_injection"]["training_mb"] / rows["keras_lora built"]["training_mb"],
                     "goal_ratio_vs_keras_lora": 1.03, "graph": graph_profile()})


def smollm2(rounds):
    """Training (ours against KerasHub LoRA) and inference (base, ours unmerged, ours merged) memory of SmolLM2."""
    bench = os.path.dirname(os.path.abspath(__file__))
    phases = {"training": ["keras_lora", "keras_lora built", "bias_injection"], "inference": ["base", "bias_injection", "bias_injection merged"]}
    runs = {phase: {m: [] for m in methods} for phase, methods in phases.items()}
    for r in range(rounds):
        for phase, methods in phases.items():
            for method in (methods if r % 2 == 0 else methods[::-1]):
                code = SMOLLM2_CHILD.format(bench=bench, train=phase == "training")
                out = subprocess.run([sys.executable, "-c", code, method], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["above_runtime_mb"] = row["peak_after_ready_mb"] - row["rss_before_model_mb"]
                runs[phase][method].append(row)
                print(phase, method, row, flush=True)
    write("memory_smollm2", {**smollm2_summary(runs, rounds), "trace": trace_profile()})


def smollm2_summary(runs, rounds):
    """Medians and ratios of the SmolLM2 runs. Inference is also given as what generating adds above the loaded
    model: merging keeps the injected model's weights resident beside the merged copy in this process, so its
    total is not what serving a merged model takes."""
    import statistics

    def median(phase, method, fn):
        return statistics.median(fn(r) for r in runs[phase][method])

    total = {p: {m: median(p, m, lambda r: r["above_runtime_mb"]) for m in ms} for p, ms in runs.items()}
    generating = {m: median("inference", m, lambda r: r["peak_after_ready_mb"] - r["rss_model_ready_mb"]) for m in runs["inference"]}
    model = {m: median("inference", m, lambda r: r["rss_model_ready_mb"] - r["rss_before_model_mb"]) for m in runs["inference"]}
    return {
        "model": "SmolLM2-135M-Instruct fp32, rank 8 on query/value",
        "training": "batch 4 x 32, Adam, 5 train_on_batch steps", "inference": "generate, batch 1, 64 new tokens, twice",
        "rounds": rounds, "all_runs": runs, "median_above_runtime_mb": total,
        "inference_model_mb": model, "inference_generating_mb": generating,
        "ratio_training_vs_keras_lora": total["training"]["bias_injection"] / total["training"]["keras_lora"],
        "ratio_training_vs_keras_lora_built": (total["training"]["bias_injection"] / total["training"]["keras_lora built"]
                                               if "keras_lora built" in total["training"] else None),  # older files: no such run
        "ratio_inference_unmerged_vs_base": total["inference"]["bias_injection"] / total["inference"]["base"],
        "ratio_generating_unmerged_vs_base": generating["bias_injection"] / generating["base"],
        "ratio_generating_merged_vs_base": generating["bias_injection merged"] / generating["base"],
        "goal_ratio": 1.03,
    }

if __name__ == "__main__":
    main()
