import keras
import numpy as np
import pytest

from keras_biasinject import BiasInjectDense, control_scope
from tests.layers.conftest import BATCH, POLICIES, PROJECTIONS, controls, fit_steps, make_base, numpy


def test_formula_by_hand():
    layer = BiasInjectDense(2, control_dim=1, neutral=1.0)
    layer.build((None, 2))
    layer.kernel.assign([[1.0, 0.0], [0.0, 2.0]])
    layer.bias.assign([0.5, -0.5])
    layer.control_kernel.assign([[10.0, 20.0]])
    x = np.array([[1.0, 1.0]], "float32")
    # x W + b = [1.5, 1.5]; (c - neutral) V with c = 3: 2 * [10, 20] = [20, 40].
    assert numpy(layer(x, control=np.array([[3.0]], "float32"))).tolist() == [[21.5, 41.5]]
    assert numpy(layer(x, control=np.array([[1.0]], "float32"))).tolist() == [[1.5, 1.5]]  # neutral
    assert numpy(layer(x)).tolist() == [[1.5, 1.5]]  # no control: neutral


def test_fresh_layer_applies_its_activation_after_the_control():
    layer = BiasInjectDense(1, control_dim=1, activation="relu", use_bias=False)
    layer.build((None, 1))
    layer.kernel.assign([[1.0]])
    layer.control_kernel.assign([[-5.0]])
    x = np.array([[2.0]], "float32")
    assert numpy(layer(x, control=np.array([[1.0]], "float32"))).tolist() == [[0.0]]  # relu(2 - 5)
    assert numpy(layer(x, control=np.array([[0.2]], "float32"))).tolist() == [[1.0]]  # relu(2 - 1)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_output_is_exactly_the_base_at_insertion(kind, policy):
    base, x = make_base(kind, dtype=policy)
    expected = numpy(base(x))
    layer = BiasInjectDense.from_layer(base, control_dim=3)
    for name, c in controls(3).items():
        assert np.array_equal(numpy(layer(x, control=c)), expected), name
    assert layer.compute_dtype == base.compute_dtype


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_training_moves_only_the_control_weights_and_neutral_stays_exact(kind):
    base, x = make_base(kind)
    expected = numpy(base(x))
    frozen = {w.name: numpy(w) for w in base.weights}
    layer = BiasInjectDense.from_layer(base, control_dim=2, neutral=[1.0, -1.0])
    assert [w.name for w in layer.trainable_weights] == ["control_kernel"]
    c = controls(2)["per_token"]
    # One SGD step: V moves exactly where its gradient is non-zero, i.e. everywhere.
    fit_steps(layer, x, c, steps=1, optimizer=keras.optimizers.SGD(0.1))
    assert np.count_nonzero(numpy(layer.control_kernel)) == np.prod(layer.control_kernel.shape)
    for w in base.weights:
        assert np.array_equal(numpy(w), frozen[w.name]), w.name
    neutral = np.broadcast_to(np.array([1.0, -1.0], "float32"), (BATCH, 2))
    assert np.array_equal(numpy(layer(x, control=neutral)), expected)
    assert not np.array_equal(numpy(layer(x, control=c)), expected)


def test_per_example_and_per_token_controls_agree():
    base, x = make_base("einsum_qkv")
    layer = BiasInjectDense.from_layer(base, control_dim=2)
    c = controls(2)["per_example"]
    fit_steps(layer, x, c, steps=2)
    per_token = np.repeat(c[:, None, :], x.shape[1], axis=1)
    np.testing.assert_allclose(numpy(layer(x, control=c)), numpy(layer(x, control=per_token)), rtol=1e-6, atol=1e-6)
    with control_scope(c):
        assert np.array_equal(numpy(layer(x)), numpy(layer(x, control=c)))


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "from_layer"])
def test_config_and_keras_file_round_trip(fresh, tmp_keras_path):
    if fresh:
        layer, x = BiasInjectDense(6, control_dim=2, activation="gelu", name="inject"), make_base("dense_gelu")[1]
    else:
        base, x = make_base("einsum_qkv")
        layer = BiasInjectDense.from_layer(base, control_dim=2, name="inject")
    c = controls(2)["per_example"]
    model = fit_steps(layer, x, c, steps=2)
    expected = numpy(model.predict([x, c], verbose=0))
    assert BiasInjectDense.from_config(layer.get_config()).get_config() == layer.get_config()
    model.save(tmp_keras_path)
    loaded = keras.models.load_model(tmp_keras_path)
    assert np.array_equal(numpy(loaded.predict([x, c], verbose=0)), expected)
    reloaded = loaded.get_layer("inject")
    assert [w.name for w in reloaded.trainable_weights] == [w.name for w in layer.trainable_weights]


def test_bad_arguments_name_the_argument_the_value_and_the_fix():
    with pytest.raises(ValueError, match="`units` must be a positive integer. Got units=0"):
        BiasInjectDense(0, control_dim=1)
    with pytest.raises(ValueError, match="`control_dim` must be a positive integer. Got control_dim=0"):
        BiasInjectDense(4, control_dim=0)
    base, x = make_base("dense_gelu")
    with pytest.raises(ValueError, match="either `units`.*Got units=4"):
        BiasInjectDense(4, control_dim=1, base_layer=base)
    with pytest.raises(ValueError, match="`control_dim` must be a positive integer"):
        BiasInjectDense.from_layer(base, control_dim=-2)
    assert base.trainable  # a failed from_layer froze nothing
    with pytest.raises(ValueError, match="'dense_.*' is not built"):
        BiasInjectDense.from_layer(keras.layers.Dense(3), control_dim=1)
    embedding = keras.layers.Embedding(10, 4)
    embedding.build((None,))
    with pytest.raises(ValueError, match="is Embedding"):
        BiasInjectDense.from_layer(embedding, control_dim=1)
    layer = BiasInjectDense.from_layer(base, control_dim=2)
    with pytest.raises(ValueError, match="control has width 1 .* control_dim=2"):
        layer(x, control=np.zeros((BATCH, 1), "float32"))


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_merge_matches_the_dynamic_control_and_unmerge_is_exact(kind, tmp_keras_path):
    base, x = make_base(kind)
    layer = BiasInjectDense.from_layer(base, control_dim=2)
    layer.control_kernel.assign(np.random.default_rng(3).normal(size=layer.control_kernel.shape).astype("float32"))
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    kernel, bias = numpy(base.kernel), None if base.bias is None else numpy(base.bias)
    c = np.array([0.7, -1.3], "float32")
    dynamic = numpy(layer(x, control=np.tile(c, (BATCH, 1))))

    layer.merge(c)
    assert layer.merged
    # (x K + b) + c V against x K + (b + c V): the same float32 sums in another order, a rounding
    # apart (measured: at most one ulp, 9.5e-7 on outputs near 12).
    np.testing.assert_allclose(numpy(layer(x)), dynamic, rtol=1e-6, atol=1e-6)
    assert np.array_equal(numpy(base.kernel), kernel)  # only the bias carries the control
    if bias is not None:
        assert not np.array_equal(numpy(base.bias), bias)
    with pytest.raises(ValueError, match="merged for one fixed control"):
        layer(x, control=np.tile(c, (BATCH, 1)))
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(c)
    with pytest.raises(ValueError, match="Call `unmerge\\(\\)` before saving"):
        model.save(tmp_keras_path)

    layer.unmerge()
    assert not layer.merged and np.array_equal(numpy(base.kernel), kernel)
    if bias is not None:
        assert np.array_equal(numpy(base.bias), bias)
    assert np.array_equal(numpy(layer(x, control=np.tile(c, (BATCH, 1)))), dynamic)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_merge_at_the_neutral_control_changes_nothing(kind):
    base, x = make_base(kind)
    expected = numpy(base(x))
    layer = BiasInjectDense.from_layer(base, control_dim=2, neutral=[1.0, -1.0])
    layer.control_kernel.assign(np.random.default_rng(3).normal(size=layer.control_kernel.shape).astype("float32"))
    weights = [numpy(w) for w in base.weights]
    for control in (None, np.array([1.0, -1.0], "float32")):  # the default is the neutral control
        layer.merge(control)
        assert all(np.array_equal(numpy(w), v) for w, v in zip(base.weights, weights))
        assert np.array_equal(numpy(layer(x)), expected)
        layer.unmerge()
