"""Why a causal LM's token embedding must stay float to train on an int8 base: the adapters' gradient on SmolLM2
with the backbone in Keras' int8, against float32, with the token embedding (the tied LM head) int8 and left float32.

The same adapter weights (random, every one non-zero) and four Fine Foods-like sentences with controls +/-1 in each
model; the loss is the recipe's (mean over real tokens). Keras' int8 `ReversibleEmbedding` computes the head in
integers with no custom gradient, so the hidden states get a gradient only through each token's input scale.
Run: python bench/int8_gradient.py  -> bench/results/int8_gradient.json (about 2 minutes on 2 CPU cores)"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write  # noqa: E402

TEXTS = ["This tea is wonderful and I will buy it again for my whole family.",
         "The coffee arrived stale and tasted like cardboard, very disappointed."] * 2
WEIGHTS = ("lora_a", "lora_b", "control_gain", "control_kernel")


def gradients(quantize, values):
    import keras
    import tensorflow as tf

    from keras_biasinject import inject, load

    lm = load("smollm2-135m", task="causal_lm", sequence_length=32)
    if quantize == "int8, head int8":
        lm.backbone.quantize("int8")
    elif quantize == "int8, head float32":
        lm.backbone.quantize("int8", filters=lambda layer: not isinstance(layer, keras.layers.ReversibleEmbedding))
    lm = inject(lm, targets="query_value", rank=8, gate="control")
    for w in lm.trainable_weights:
        w.assign(values.setdefault(w.path, np.random.default_rng(len(values)).normal(scale=0.02, size=w.shape).astype("float32")))
    x, y, sw = lm.preprocessor(TEXTS)
    x = {**x, "control": np.array([[1.0], [-1.0], [1.0], [-1.0]], "float32")}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    with tf.GradientTape() as tape:
        loss = loss_fn(y, lm(x, training=False), sample_weight=sw)
    grads = tape.gradient(loss, lm.trainable_weights)
    return float(loss), {w.path: g.numpy().ravel() for w, g in zip(lm.trainable_weights, grads)}


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    values = {}
    losses, grads = {}, {}
    for name in ("float32", "int8, head int8", "int8, head float32"):
        losses[name], grads[name] = gradients(name, values)
    out = {"losses": losses, "against_float32": {}}
    for name in ("int8, head int8", "int8, head float32"):
        rows = {}
        for kind in WEIGHTS:
            a = np.concatenate([v for k, v in grads["float32"].items() if k.endswith(kind)])
            b = np.concatenate([v for k, v in grads[name].items() if k.endswith(kind)])
            rows[kind] = {"cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), "norm_ratio": float(np.linalg.norm(b) / np.linalg.norm(a))}
        out["against_float32"][name] = rows
        print(name, rows, flush=True)
    write("int8_gradient", out)


if __name__ == "__main__":
    main()
