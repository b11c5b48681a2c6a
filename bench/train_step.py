"""Training step time: bias injection (rank 8, query/value) against KerasHub's enable_lora(8) and
full fine-tuning, on the same model and batch. Run: python bench/train_step.py [--smollm2] [--xla]
`--xla` adds KerasHub LoRA and ours compiled with `jit_compile=True` (Keras' "auto" leaves XLA off on CPU)
to the same interleaved run, and reports each one's XLA speed-up.

Writes bench/results/train_step.json with ratio_vs_keras_lora (goal <= 1.05) and ratio_vs_full
(goal <= 0.75), medians of interleaved steps after warm-up.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from timing import device, interleaved, summary, write  # noqa: E402

from keras_biasinject import inject  # noqa: E402


def gpt2(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=5000, num_layers=4, num_heads=4, hidden_dim=256,
                                             intermediate_dim=1024, max_sequence_length=128)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def smollm2():
    from keras_biasinject.models import load

    lm = load("smollm2-135m", task="causal_lm")
    lm.preprocessor = None
    return lm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (batch 4 x 32) instead of the 4-layer GPT2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--xla", action="store_true", help="also LoRA and ours with jit_compile=True, side by side")
    parser.add_argument("--out", help="results file name under bench/results/ (default: train_step or train_step_smollm2)")
    args = parser.parse_args()
    build = smollm2 if args.smollm2 else gpt2
    batch, seq, vocab = (4, 32, 49152) if args.smollm2 else (8, 128, 5000)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, vocab, (batch, seq)).astype("int32"), "padding_mask": np.ones((batch, seq), "int32")}
    y = rng.integers(1, vocab, (batch, seq)).astype("int32")

    models = {}
    full = build()
    models["full"] = (full, x)
    lora = build()
    lora.backbone.enable_lora(8)
    models["keras_lora"] = (lora, x)
    ours = inject(build(), rank=8, targets="query_value")
    models["bias_injection"] = (ours, {**x, "control": np.ones((batch, 1), "float32")})
    if args.xla:
        lora_xla = build()
        lora_xla.backbone.enable_lora(8)
        models["keras_lora xla"] = (lora_xla, x)
        models["bias_injection xla"] = (inject(build(), rank=8, targets="query_value"), models["bias_injection"][1])
    fns, params = {}, {}
    for name, (model, inputs) in models.items():
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=name.endswith(" xla") or "auto")
        params[name] = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        fns[name] = (lambda m, i: (lambda: m.train_on_batch(i, y)))(model, inputs)
    times = summary(interleaved(fns, rounds=args.rounds, warmup=3))
    result = {
        "model": "SmolLM2-135M" if args.smollm2 else "GPT2 4 layers, hidden 256, vocab 5000",
        "batch": batch, "sequence_length": seq, "rank": 8, "targets": "query_value",
        "steps": times, "trainable_params": params,
        "ratio_vs_keras_lora": times["bias_injection"]["median_ms"] / times["keras_lora"]["median_ms"],
        "ratio_vs_full": times["bias_injection"]["median_ms"] / times["full"]["median_ms"],
        "goals": {"ratio_vs_keras_lora": 1.05, "ratio_vs_full": 0.75},
        **device(),
    }
    if args.xla:  # > 1: XLA is faster
        result["xla_speedup"] = {m: times[m]["median_ms"] / times[f"{m} xla"]["median_ms"] for m in ("keras_lora", "bias_injection")}
        result["xla_ratio_vs_keras_lora"] = times["bias_injection xla"]["median_ms"] / times["keras_lora xla"]["median_ms"]
    write(args.out or ("train_step_smollm2" if args.smollm2 else "train_step"), result)


if __name__ == "__main__":
    main()
