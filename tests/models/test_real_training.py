"""Smoke tests on the real checkpoints and real reviews: load, forward, one training step."""

import keras
import numpy as np
import pytest

from keras_biasinject import inject
from keras_biasinject.data import DataConfig, make_dataset
from keras_biasinject.models import load

REVIEWS = dict(source="small_fine_foods", text_column="review", label_column="label", shuffle_seed=0)


def one_step(model, batch):
    frozen = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.weights if not v.trainable}
    trained = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(batch, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    assert all(np.array_equal(after[p], v) for p, v in frozen.items())  # the base is bit-identical
    # B and V start at zero, so the first step moves them (A and U get their first gradient once B != 0).
    zero_started = [p for p in trained if p.endswith(("lora_b", "control_kernel"))]
    assert zero_started and all(not np.array_equal(after[p], trained[p]) for p in zero_started)
    return history.history["loss"][0]


@pytest.mark.slow
def test_minilm_classifier_trains_on_real_reviews():
    clf = load("minilm-l6", task="classifier", num_classes=2, sequence_length=64)
    ds = make_dataset(DataConfig(**REVIEWS, control_map={"great": 1.0, "other": 1.0}, batch_size=8), clf.preprocessor, split="train[:8]")
    x, y = next(iter(ds))
    base_logits = keras.ops.convert_to_numpy(clf.backbone({k: v for k, v in x.items() if k != "control"})["pooled_output"])
    clf = inject(clf, rank=4, trainable=["logits"])
    assert np.array_equal(
        keras.ops.convert_to_numpy(clf.backbone(dict(x))["pooled_output"]), base_logits
    )  # exact at insertion, real weights, real text
    clf.preprocessor = None  # the batch is tokenized already
    one_step(clf, ds)


@pytest.mark.slow
def test_smollm2_causal_lm_trains_on_real_reviews():
    lm = load("smollm2-135m", task="causal_lm", sequence_length=32)
    ds = make_dataset(DataConfig(**REVIEWS, control_map={"great": 1.0, "other": -1.0}, batch_size=2), lm.preprocessor, split="train[:2]")
    x, y, w = next(iter(ds))
    base_logits = keras.ops.convert_to_numpy(lm({k: v for k, v in x.items() if k != "control"}))
    lm = inject(lm, rank=4)
    assert np.array_equal(keras.ops.convert_to_numpy(lm(dict(x))), base_logits)
    lm.preprocessor = None
    one_step(lm, ds)
