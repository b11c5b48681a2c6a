"""The recipe's data helpers: one convention for controls, tested with a vector `neutral`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject import inject
from keras_biasinject.recipes import Recipe
from keras_biasinject.recipes.datasets import control_vector, splits, with_control
from tests.rewrite.tiny_models import gpt2, tokens

NEUTRAL = [0.5, -1.0]  # unequal entries: their mean (-0.25) is not the neutral control


def _recipe(**inject_fields):
    return Recipe(task="causal_lm", model={"spec": "x"}, inject={"control_dim": 2, "neutral": NEUTRAL, **inject_fields},
                  data={"source": "x.csv", "text_column": "t", "control_columns": ["a", "b"]})


def test_control_vector_convention():
    recipe = _recipe()
    assert control_vector(recipe).tolist() == NEUTRAL  # None: the neutral control, entry by entry
    assert control_vector(recipe, 1.0).tolist() == [1.0, 1.0]  # a number: that value in every dimension
    assert control_vector(recipe, [2.0, 3.0]).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="a control must be finite. Got nan"):
        control_vector(recipe, float("nan"))


def test_control_off_is_the_base_exactly_with_a_vector_neutral():
    recipe = _recipe(targets="attention", rank=2, gate="control")
    backbone = gpt2()
    x = tokens()
    base = keras.ops.convert_to_numpy(backbone(x))
    model = inject(backbone, recipe.inject)
    rng = np.random.default_rng(0)
    for variable in model.trainable_weights:  # a trained-looking adapter: every added weight non-zero
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    data = tf.data.Dataset.from_tensors({**x, "control": np.zeros((3, 2), "float32")})
    ((off,),) = list(with_control(data, control_vector(recipe)))  # (x, *rest) with no labels here
    assert off["control"].numpy().tolist() == [NEUTRAL] * 3
    assert np.array_equal(keras.ops.convert_to_numpy(model(off)), base)  # ==, not close
    ((mean,),) = list(with_control(data, np.full(2, np.mean(NEUTRAL), "float32")))  # the old, wrong convention
    assert not np.array_equal(keras.ops.convert_to_numpy(model(mean)), base)


def test_splits_follow_the_example_limits():
    recipe = Recipe(task="causal_lm", model={"spec": "x"}, train={"max_train_examples": 8, "max_eval_examples": 4},
                    data={"source": "x.csv", "text_column": "t", "control_columns": ["a"], "splits": {"test": "t.csv"}})
    data, named = splits(recipe)
    assert "splits" not in data
    assert named == {"train": "train[:8]", "validation": "train[-4:]", "test": "t.csv"}
    bad = Recipe(task="causal_lm", model={"spec": "x"}, data={"splits": {"dev": "d.csv"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dev'\] in \[data.splits\]"):
        splits(bad)
