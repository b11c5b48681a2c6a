"""Steered generation speed on the real SmolLM2-135M: tokens per second of `generate`, side by side.

At batch 1 and 8, 64 new tokens after the prompt "This tea is" (no stop token, so every call makes
exactly 64): the base; ours unmerged with one control; at batch 8, 8 different controls in one batch;
ours merged for one control; and the per-adapter way to serve 8 behaviours (a merged model per
behaviour, one batch-1 call each: timed as one merged model called 8 times, which costs the same time
as 8 different ones). The methods take turns round after round (timing.interleaved); medians.

Adapters: rank 8 on query/value in all 30 blocks, with trained-looking non-zero weights (but the
control's bias term V zero, so that the merged model exists: SmolLM2's q/v have no bias to fold it into). `--xla` adds
the same with `jit_compile=True` (off by default on CPU in Keras).
Run: python bench/generation.py [--rounds 3] [--xla | --xla-only] [--out NAME]  -> bench/results/generation.json
On a GPU with JAX: KERAS_BACKEND=jax python bench/generation.py --xla-only --out generation_gpu
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import device, interleaved, summary, write  # noqa: E402

NEW_TOKENS = 64
PROMPT = "This tea is"
GOALS = {"unmerged_vs_base_tokens_per_s": 0.97, "mixed_vs_single_control_tokens_per_s": 0.97,
         "mixed_batch_vs_per_adapter_speedup": 4.0}


def models(xla):
    """(base, injected, merged) SmolLM2 CausalLMs; the adapters hold seeded random weights."""
    from keras_biasinject import inject, load, merge

    base = load("smollm2-135m", task="causal_lm")
    injected = inject(load("smollm2-135m", task="causal_lm"), targets="query_value", rank=8)
    rng = np.random.default_rng(0)
    for v in injected.trainable_weights:  # trained-looking adapters: non-zero (A, B, U) ...
        v.assign(rng.normal(scale=0.02, size=v.shape).astype("float32"))
    for v in injected.trainable_weights:  # ... but V = 0: SmolLM2's q/v have no bias to fold (c - neutral) V into
        if v.path.endswith("control_kernel"):  # on merging; unmerged, the term is computed all the same
            v.assign(np.zeros(v.shape, "float32"))
    merged = merge(injected, [0.7])
    for lm in (base, injected, merged):
        lm.jit_compile = xla
    return base, injected, merged


def generate_fn(lm, batch, control=None):
    prompts = [PROMPT] * batch
    length = len(lm.preprocessor.tokenizer(PROMPT)) + 1 + NEW_TOKENS  # + the start token
    kwargs = {} if control is None else {"control": control}
    return lambda: lm.generate(prompts, max_length=length, stop_token_ids=None, **kwargs)


def measure(xla, rounds):
    base, injected, merged = models(xla)
    mixed = np.linspace(-1.0, 1.0, 8, dtype="float32")[:, None]  # 8 different controls, [8, 1]
    one = np.full((8, 1), 0.7, "float32")
    fns = {
        "base b1": generate_fn(base, 1), "unmerged b1": generate_fn(injected, 1, [0.7]), "merged b1": generate_fn(merged, 1),
        "base b8": generate_fn(base, 8), "unmerged b8": generate_fn(injected, 8, one),
        "mixed b8": generate_fn(injected, 8, mixed), "merged b8": generate_fn(merged, 8),
    }
    per_adapter_once = generate_fn(merged, 1)
    fns["per-adapter 8 x b1"] = lambda: [per_adapter_once() for _ in range(8)]
    times = summary(interleaved(fns, rounds=rounds, warmup=1))
    tokens = {name: (8 if ("b8" in name or "8 x" in name) else 1) * NEW_TOKENS for name in fns}
    for name, t in times.items():
        t["tokens_per_s"] = tokens[name] / (t["median_ms"] / 1000)
    tps = {name: t["tokens_per_s"] for name, t in times.items()}
    for lm in (base, injected):  # the exact off switch, in this mode: greedy, as KerasHub's default sampler (top-k) draws at random
        lm.compile(sampler="greedy")
        lm.jit_compile = xla
    neutral = generate_fn(injected, 8, np.zeros((8, 1), "float32"))()
    return {
        "times": times,
        "neutral_control_text_equals_base": bool(np.array_equal(np.asarray(neutral), np.asarray(generate_fn(base, 8)()))),
        "unmerged_vs_base_tokens_per_s": {"b1": tps["unmerged b1"] / tps["base b1"], "b8": tps["unmerged b8"] / tps["base b8"]},
        "merged_vs_base_tokens_per_s": {"b1": tps["merged b1"] / tps["base b1"], "b8": tps["merged b8"] / tps["base b8"]},
        "mixed_vs_single_control_tokens_per_s": tps["mixed b8"] / tps["unmerged b8"],
        "mixed_batch_vs_per_adapter_speedup": tps["mixed b8"] / tps["per-adapter 8 x b1"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--xla", action="store_true", help="also with jit_compile=True")
    parser.add_argument("--xla-only", action="store_true",
                        help="only with jit_compile=True (on JAX, Keras' default: without it JAX runs op by op)")
    parser.add_argument("--out", default="generation", help="results file name under bench/results/ (default: generation)")
    args = parser.parse_args()
    result = {"model": "SmolLM2-135M-Instruct fp32", "prompt": PROMPT, "new_tokens": NEW_TOKENS, "rank": 8,
              "targets": "query_value (60 layers)", "rounds": args.rounds, "goals": GOALS, **device()}
    if not args.xla_only:
        result["graph"] = measure(False, args.rounds)
    if args.xla or args.xla_only:
        result["xla"] = measure(True, args.rounds)
    if "graph" in result and "xla" in result:
        result["xla_vs_graph_tokens_per_s"] = {
            name: result["xla"]["times"][name]["tokens_per_s"] / t["tokens_per_s"] for name, t in result["graph"]["times"].items()}
    write(args.out, result)
    print({mode: {k: v for k, v in result[mode].items() if k != "times"} for mode in ("graph", "xla") if mode in result})


if __name__ == "__main__":
    main()
