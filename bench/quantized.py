"""Fewer bytes per token: SmolLM2-135M with its backbone in Keras' int8 (`quantize("int8")`) against fp32.

1. Generation speed, side by side (also the base loaded in bfloat16, and with the same adapters in bfloat16) (timing.interleaved, medians): tokens/s of `generate` at batch 1, 64
   new tokens after "This tea is": the fp32 base, the int8 base, and the int8 base with rank-8 adapters
   (float32) on query/value run unmerged with a control. Goal: int8 with a control >= 2x the fp32 base.
2. Quality: perplexity on 128 held-out Jane Austen paragraphs (mean over real tokens) of the fp32 base,
   the int8 base, and the injected int8 model at the neutral control, which must equal the int8 base
   exactly. Goal: int8 within 3% of fp32.
3. The profile (`--profile-only` adds just that to an existing file): where an int8 layer's time goes on
   this CPU. One decoding step's feed-forward projection of SmolLM2 (a [1, 1, 576] input through a
   576 -> 1536 Dense, no bias) in float32, in bfloat16, and in int8, with the int8 call cut into its three
   parts: quantizing the input (abs-max per token), the int8 x int8 -> int32 matmul, and scaling back.
   Each `tf.function` is called 200 times per round; an identity function gives the per-call overhead.
4. Two ways to lose less quality (`--variants-only` adds just these): the blocks in int8 with the token embedding
   (and so the tied LM head) left in float32 (`quantize("int8", filters=...)`), and int8 weights with float inputs
   (`Int8QuantizationConfig(activation_quantizer=None)`): their Austen perplexity.
Run: python bench/quantized.py [--rounds 3] [--profile-only | --variants-only]  -> bench/results/quantized.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from generation import NEW_TOKENS, PROMPT, generate_fn  # noqa: E402
from steering import perplexities  # noqa: E402
from timing import RESULTS, device, interleaved, summary, write  # noqa: E402

GOALS = {"int8_with_control_vs_fp32_tokens_per_s": 2.0, "int8_vs_fp32_perplexity": 1.03}
SEQUENCE_LENGTH = 128


def profile(rounds=5, calls=200):
    """{part: microseconds per call} of one decoding step's 576 -> 1536 projection (see the module's docstring)."""
    import keras
    import tensorflow as tf

    x = tf.random.stateless_normal((1, 1, 576), seed=(0, 1))
    layers = {}
    for name, dtype in (("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "float32")):
        layer = keras.layers.Dense(1536, use_bias=False, dtype=dtype)
        layer.build((None, None, 576))
        if name == "int8":
            layer.quantize("int8")
        layers[name] = layer
    int8 = layers["int8"]
    x8, scale = keras.quantizers.abs_max_quantize(x, axis=-1)
    acc = tf.matmul(tf.reshape(x8, (1, 576)), int8._kernel, output_type=tf.int32)
    x16 = tf.cast(x, "bfloat16")
    parts = {
        "call overhead (identity)": (tf.function(lambda v: v), x),
        "float32 layer": (tf.function(layers["float32"]), x),
        "bfloat16 layer": (tf.function(layers["bfloat16"]), x16),
        "int8 layer": (tf.function(int8), x),
        "int8 part 1: quantize the input": (tf.function(lambda v: keras.quantizers.abs_max_quantize(v, axis=-1)), x),
        "int8 part 2: int8 matmul": (tf.function(lambda v: tf.matmul(v, int8._kernel, output_type=tf.int32)), tf.reshape(x8, (1, 576))),
        "int8 part 3: scale back": (tf.function(lambda v: tf.cast(v, "float32") / (int8.kernel_scale * scale[0, 0])), acc),
    }

    def repeated(fn, arg):
        def run():
            for _ in range(calls):
                fn(arg)
        return run

    times = summary(interleaved({name: repeated(fn, arg) for name, (fn, arg) in parts.items()}, rounds=rounds, warmup=1))
    return {name: 1000 * t["median_ms"] / calls for name, t in times.items()}


def variants(texts):
    """{variant: Austen perplexity} of the two int8 variants (see the module's docstring)."""
    import keras

    from keras_biasinject import load

    blocks = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    blocks.backbone.quantize("int8", filters=lambda layer: layer.name != "token_embedding")
    weights = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    weights.backbone.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    return {"int8 blocks, embedding float32": perplexities(blocks, texts, {"": None})[""],
            "int8 weights only (float inputs)": perplexities(weights, texts, {"": None})[""]}


def austen_texts():
    from keras_biasinject.data import load_dataset

    return [ex["text"].numpy().decode() for ex in load_dataset("jane_austen", "test").take(128)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--profile-only", action="store_true", help="add only the per-layer profile to the existing file")
    parser.add_argument("--variants-only", action="store_true", help="add only the two int8 variants' perplexity to the existing file")
    args = parser.parse_args()
    if args.variants_only:
        data = json.loads((RESULTS / "quantized.json").read_text())
        data["int8_variants_perplexity"] = variants(austen_texts())
        return write("quantized", data)
    if args.profile_only:
        path = RESULTS / "quantized.json"
        data = json.loads(path.read_text())
        data["profile_us_per_call"] = profile()
        return write("quantized", data)
    from keras_biasinject import inject, load

    fp32 = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    int8 = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    int8.backbone.quantize("int8")
    steered = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH)
    steered.backbone.quantize("int8")
    steered = inject(steered, targets="query_value", rank=8)
    bf16 = load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH, dtype="bfloat16")
    bf16_steered = inject(load("smollm2-135m", task="causal_lm", sequence_length=SEQUENCE_LENGTH, dtype="bfloat16"),
                          targets="query_value", rank=8)  # the adapters take the base's bfloat16
    rng = np.random.default_rng(0)
    for v in steered.trainable_weights:  # trained-looking adapters
        v.assign(rng.normal(scale=0.02, size=v.shape).astype("float32"))
    for v, w in zip(bf16_steered.trainable_weights, steered.trainable_weights):  # the same values
        v.assign(w.numpy().astype(v.dtype))

    texts = austen_texts()
    ppl = {"fp32 base": perplexities(fp32, texts, {"": None})[""], "int8 base": perplexities(int8, texts, {"": None})[""],
           "int8 + adapters, neutral control": perplexities(steered, texts, {"": 0.0})[""],
           "bf16 base": perplexities(bf16, texts, {"": None})[""],
           "bf16 + adapters, neutral control": perplexities(bf16_steered, texts, {"": 0.0})[""]}
    assert ppl["int8 + adapters, neutral control"] == ppl["int8 base"], ppl  # the exact off switch holds on int8
    assert ppl["bf16 + adapters, neutral control"] == ppl["bf16 base"], ppl  # and on bfloat16

    fns = {"fp32 base": generate_fn(fp32, 1), "int8 base": generate_fn(int8, 1), "int8 + control": generate_fn(steered, 1, [0.7]),
           "bf16 base": generate_fn(bf16, 1), "bf16 + control": generate_fn(bf16_steered, 1, [0.7])}
    times = summary(interleaved(fns, rounds=args.rounds, warmup=1))
    for t in times.values():
        t["tokens_per_s"] = NEW_TOKENS / (t["median_ms"] / 1000)
    write("quantized", {
        "model": "SmolLM2-135M-Instruct, backbone quantize('int8') (token embedding and projections)",
        "prompt": PROMPT, "new_tokens": NEW_TOKENS, "batch": 1, "rounds": args.rounds, "times": times,
        "int8_vs_fp32_tokens_per_s": times["int8 base"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "int8_with_control_vs_fp32_tokens_per_s": times["int8 + control"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "bf16_vs_fp32_tokens_per_s": times["bf16 base"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "bf16_with_control_vs_fp32_tokens_per_s": times["bf16 + control"]["tokens_per_s"] / times["fp32 base"]["tokens_per_s"],
        "bf16_vs_fp32_perplexity": ppl["bf16 base"] / ppl["fp32 base"],
        "austen_paragraphs": len(texts), "sequence_length": SEQUENCE_LENGTH, "austen_perplexity": ppl,
        "int8_vs_fp32_perplexity": ppl["int8 base"] / ppl["fp32 base"], "goals": GOALS,
        "profile_us_per_call": profile(), "int8_variants_perplexity": variants(texts), **device(),
    })


if __name__ == "__main__":
    main()
