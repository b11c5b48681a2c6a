"""Fewer bytes per token: SmolLM2-135M with its backbone in Keras' int8 (`quantize("int8")`) against fp32.

1. Generation speed, side by side (timing.interleaved, medians): tokens/s of `generate` at batch 1, 64
   new tokens after "This tea is": the fp32 base, the int8 base, and the int8 base with rank-8 adapters
   (float32) on query/value run unmerged with a control. Goal: int8 with a control >= 2x the fp32 base.
2. Quality: perplexity on 128 held-out Jane Austen paragraphs (mean over real tokens) of the fp32 base,
   the int8 base, and the injected int8 model at the neutral control, which must equal the int8 base
   exactly. Goal: int8 within 3% of fp32.
Run: python bench/quantized.py [--rounds 3]  -> bench/results/quantized.json
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from generation import NEW_TOKENS, PROMPT, generate_fn  # noqa: E402
from steering import perplexities  # noqa: E402
from timing import device, interleaved, summary, write  # noqa: E402

GOALS = {"int8_with_control_vs_fp32_tokens_per_s": 2.0, "int8_vs_fp32_perplexity": 1.03}
SEQUENCE_LENGTH = 128


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    args = parser.parse_args()
    from keras_biasinject import inject, load
    from keras_biasinject.data import load_dataset

    fp32 = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    int8 = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    int8.backbone.quantize("int8")
    steered = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    steered.backbone.quantize("int8")
    steered = inject(steered, targets="query_value", rank=8)
    rng = np.random.default_rng(0)
    for v in steered.trainable_weights:  # trained-looking adapters
        v.assign(rng.normal(scale=0.02, size=v.shape).astype("float32"))

    texts = [ex["text"].numpy().decode() for ex in load_dataset("jane_austen", "test").take(128)]
    ppl = {"fp32 base": perplexities(fp32, texts, {"": None})[""], "int8 base": perplexities(int8, texts, {"": None})[""],
           "int8 + adapters, neutral control": perplexities(steered, texts, {"": 0.0})[""]}
    assert ppl["int8 + adapters, neutral control"] == ppl["int8 base"], ppl  # the exact off switch holds on int8

    fns = {"fp32 base": generate_fn(fp32, 1), "int8 base": generate_fn(int8, 1), "int8 + control": generate_fn(steered, 1, [0.7])}
    times = summary(interleaved(fns, rounds=args.rounds, warmup=1))
    for t in times.values():
        t["tokens_per_s"] = NEW_TOKENS / (t["median_ms"] / 1000)
    write("quantized", {
        "model": "SmolLM2-135M-Instruct, backbone quantize('int8') (token embedding and projections)",
        "prompt": PROMPT, "new_tokens": NEW_TOKENS, "batch": 1, "rounds": args.rounds, "times": times,
        "int8_vs_fp32_tokens_per_s": times["int8 base"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "int8_with_control_vs_fp32_tokens_per_s": times["int8 + control"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "austen_paragraphs": len(texts), "sequence_length": SEQUENCE_LENGTH, "austen_perplexity": ppl,
        "int8_vs_fp32_perplexity": ppl["int8 base"] / ppl["fp32 base"], "goals": GOALS, **device(),
    })


if __name__ == "__main__":
    main()
