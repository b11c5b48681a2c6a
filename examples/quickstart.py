"""Splice control adapters into a tiny KerasHub GPT-2, check the zero-impact guarantee, train a few steps.

Run: python examples/quickstart.py   (about a minute on 2 CPU cores; no downloads)

Until `keras_biasinject.inject` lands, this does the splice by hand: each block's attention query and
value projections are wrapped in a `LoRABiasAdapter`, and a small model routes its `control` input to
them with `control_scope`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_biasinject import LoRABiasAdapter, control_scope  # noqa: E402

VOCAB, SEQ, BATCH = 1000, 16, 8  # batch 8 x 16 tokens = 128 tokens per step


def splice(backbone, rank=4, control_dim=1):
    """Wraps every block's query and value projections; returns the adapters."""
    adapters = []
    for block in backbone.transformer_layers:
        attention = block._self_attention_layer
        attention._tracker.unlock()  # built KerasHub layers lock their attributes
        for attr in ["_query_dense", "_value_dense"]:
            with keras.name_scope(block.name), keras.name_scope(attention.name):
                adapter = LoRABiasAdapter(getattr(attention, attr), rank, control_dim, gate="control")
            setattr(attention, attr, adapter)
            adapters.append(adapter)
        attention._tracker.lock()
    return adapters


class Steered(keras.Model):
    """A backbone plus a sentiment-like head whose adapters read `inputs["control"]`."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = keras.layers.Dense(2, name="head")

    def call(self, inputs):
        with control_scope(inputs["control"]):
            hidden = self.backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]})
        return self.head(hidden[:, -1, :])  # (B, 2) from the last token


def main():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32, intermediate_dim=64, max_sequence_length=SEQ
    )
    rng = np.random.default_rng(0)
    tokens = {"token_ids": rng.integers(0, VOCAB, (BATCH, SEQ)), "padding_mask": np.ones((BATCH, SEQ), "int32")}
    before = keras.ops.convert_to_numpy(backbone(tokens))
    base_weights = {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}

    adapters = splice(backbone)
    backbone.trainable = True
    for layer in backbone._flatten_layers():
        if not isinstance(layer, LoRABiasAdapter) and layer is not backbone and not layer._layers:
            layer.trainable = False  # selective backpropagation: only adapter weights train
    control = rng.choice([-1.0, 1.0], size=(BATCH, 1)).astype("float32")
    with control_scope(control):
        after = keras.ops.convert_to_numpy(backbone(tokens))
    print(f"spliced {len(adapters)} adapters; max |output change| at insertion: {np.max(np.abs(after - before))}")
    assert np.array_equal(before, after), "zero-impact guarantee violated"

    # Learn to read the control: label 1 when the control is +1.
    model = Steered(backbone)
    inputs = {**tokens, "control": control}
    labels = (control[:, 0] > 0).astype("int32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(inputs, labels, epochs=20, batch_size=BATCH, verbose=0)
    print(f"trainable weights: {sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} of {model.count_params():,}")
    print(f"loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}, "
          f"accuracy {history.history['accuracy'][-1]:.2f}")

    after_training = {w.path: keras.ops.convert_to_numpy(w) for w in backbone.weights}
    frozen_unchanged = all(np.array_equal(after_training[path], v) for path, v in base_weights.items())
    with control_scope(np.zeros((BATCH, 1), "float32")):
        neutral = keras.ops.convert_to_numpy(backbone(tokens))
    print(f"base weights bit-identical after training: {frozen_unchanged}; "
          f"neutral control reproduces the base exactly: {np.array_equal(neutral, before)}")


if __name__ == "__main__":
    main()
