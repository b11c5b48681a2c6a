"""Splice control adapters into a tiny KerasHub GPT-2, check the zero-impact guarantee, train a few steps.

Run: python examples/quickstart.py   (about 15 s on 2 CPU cores; random weights, no downloads)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_biasinject import inject  # noqa: E402

VOCAB, SEQ, BATCH = 1000, 16, 8  # batch 8 x 16 tokens = 128 tokens per step


def main():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32, intermediate_dim=64, max_sequence_length=SEQ
    )
    classifier = keras.Sequential([keras.layers.Lambda(lambda h: h[:, -1, :]), keras.layers.Dense(2)], name="head")
    rng = np.random.default_rng(0)
    tokens = {"token_ids": rng.integers(0, VOCAB, (BATCH, SEQ)), "padding_mask": np.ones((BATCH, SEQ), "int32")}
    before = keras.ops.convert_to_numpy(backbone(tokens))
    base_weights = {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}

    backbone = inject(backbone, targets="query_value", rank=4, control_dim=1, gate="control")
    backbone.summary()
    control = rng.choice([-1.0, 1.0], size=(BATCH, 1)).astype("float32")
    after = keras.ops.convert_to_numpy(backbone({**tokens, "control": control}))
    print(f"max |output change| at insertion, control +/-1: {np.max(np.abs(after - before))}")
    assert np.array_equal(before, after), "zero-impact guarantee violated"

    # A toy task: label 1 when the control is +1. Only the adapters (and the head) can learn it.
    inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in tokens}
    inputs["control"] = keras.Input(shape=(1,), name="control")
    model = keras.Model(inputs, classifier(backbone(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit({**tokens, "control": control}, (control[:, 0] > 0).astype("int32"), epochs=20, batch_size=BATCH, verbose=0)
    print(f"loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}, accuracy {history.history['accuracy'][-1]:.2f}")

    trained = {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}
    unchanged = all(np.array_equal(trained[path], value) for path, value in base_weights.items())
    neutral = keras.ops.convert_to_numpy(backbone({**tokens, "control": np.zeros((BATCH, 1), "float32")}))
    print(f"base weights bit-identical after training: {unchanged}; neutral control gives the base output exactly: "
          f"{np.array_equal(neutral, before)}")
    assert unchanged and np.array_equal(neutral, before)


if __name__ == "__main__":
    main()
