"""Tiny base projections shared by the layer tests (hidden 16, 4 heads of 8, seq 5)."""

import keras
import numpy as np
import pytest

BATCH, SEQ, HIDDEN, HEADS, HEAD_DIM = 3, 5, 16, 4, 8

# name -> (factory, input shape): the three projection shapes KerasHub uses.
PROJECTIONS = {
    # feed-forward Dense with an activation, as GPT-2's intermediate layer
    "dense_gelu": (lambda dtype: keras.layers.Dense(12, activation="gelu", dtype=dtype), (BATCH, SEQ, HIDDEN)),
    # attention query/key/value: [hidden, heads, head_dim]
    "einsum_qkv": (
        lambda dtype: keras.layers.EinsumDense("abc,cde->abde", (None, HEADS, HEAD_DIM), bias_axes="de", dtype=dtype),
        (BATCH, SEQ, HIDDEN),
    ),
    # attention output: [heads, head_dim, hidden], no bias (as Llama)
    "einsum_out": (
        lambda dtype: keras.layers.EinsumDense("abcd,cde->abe", (None, HIDDEN), dtype=dtype),
        (BATCH, SEQ, HEADS, HEAD_DIM),
    ),
}
POLICIES = ["float32", "mixed_float16", "mixed_bfloat16"]


def make_base(name, dtype="float32", seed=0):
    """A built base projection with random (non-zero) kernel and bias, and a random input for it."""
    factory, shape = PROJECTIONS[name]
    layer = factory(dtype)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    x = rng.normal(size=shape).astype("float32")
    return layer, x


def controls(control_dim, seed=1):
    """Random non-neutral controls: per example [batch, k] and per token [batch, seq, k]."""
    rng = np.random.default_rng(seed)
    return {
        "per_example": rng.normal(size=(BATCH, control_dim)).astype("float32"),
        "per_token": rng.normal(size=(BATCH, SEQ, control_dim)).astype("float32"),
    }


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))


def fit_steps(layer, x, control, steps=5, lr=0.05, optimizer=None):
    """Trains `layer` (x, control) -> y towards a random target with `fit`; returns the model."""
    x_in = keras.Input(shape=x.shape[1:], name="x")
    c_in = keras.Input(shape=control.shape[1:], name="control")
    model = keras.Model([x_in, c_in], layer(x_in, control=c_in))
    target = np.random.default_rng(7).normal(size=numpy(model([x, control])).shape).astype("float32")
    model.compile(optimizer=optimizer or keras.optimizers.Adam(lr), loss="mse")
    model.fit([x, control], target, epochs=steps, batch_size=x.shape[0], verbose=0, shuffle=False)
    return model


@pytest.fixture
def tmp_keras_path(tmp_path):
    return str(tmp_path / "model.keras")
