"""The linear probe's solver (the frozen base's head): optima worked out by hand, and the vanishing gradient."""

import numpy as np
import pytest

from keras_biasinject.recipes.linear_probe import L2_GRID, MAX_STEPS, _objective_and_gradient, fit_logistic_regression


@pytest.mark.parametrize("weights, probabilities", [
    (None, [0.75, 0.25]),  # 3 of 4 examples are class 0
    ([1.0, 1.0, 1.0, 3.0], [0.5, 0.5]),  # class 1 weighted 3x: balanced
])
def test_without_information_in_the_features_the_probe_predicts_the_weighted_class_shares(weights, probabilities):
    """Zero features: W stays 0 (only the penalty acts on it) and softmax(b) equals the weighted shares."""
    kernel, bias, _, _ = fit_logistic_regression(np.zeros((4, 3)), [0, 0, 0, 1], 2, l2=1e-2, sample_weight=weights)
    assert np.all(kernel == 0.0)
    p = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(p, probabilities, atol=1e-6)


@pytest.mark.parametrize("l2", L2_GRID[:3])
def test_the_probe_reaches_the_penalized_optimum(l2):
    """On random 3-class data the gradient of the penalized objective vanishes at the returned weights,
    and a larger penalty gives a smaller kernel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    labels = np.argmax(x[:, :3] + rng.normal(scale=0.5, size=(60, 3)), axis=1)
    kernel, bias, params, steps = fit_logistic_regression(x, labels, 3, l2)
    design = np.concatenate([x, np.ones((60, 1))], axis=1)
    _, gradient = _objective_and_gradient(params, design, np.eye(3)[labels], np.ones(60), l2)
    assert steps < MAX_STEPS and np.abs(gradient).max() < 1e-6
    stronger, _, _, _ = fit_logistic_regression(x, labels, 3, l2 * 10)
    assert np.linalg.norm(stronger) < np.linalg.norm(kernel)


def test_an_empty_split_is_refused_by_name():
    import keras
    import tensorflow as tf

    from keras_biasinject.recipes.linear_probe import head_features

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(keras.layers.Dense(4)(inputs)))
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 3), "float32"), np.zeros((0,), "int32"))).batch(2)
    with pytest.raises(ValueError, match=r"linear probe: the validation split holds no examples; .* Give each examples"):
        head_features(model, empty, "validation")
    three = tf.data.Dataset.from_tensor_slices((np.ones((3, 3), "float32"), np.array([0, 1, 1], "int32"))).batch(2)
    features, labels = head_features(model, three, "training")  # the head's input, batch by batch
    assert features.shape == (3, 4) and labels.tolist() == [0, 1, 1]
