import math

import keras
import numpy as np
import pytest

from keras_biasinject import DecayFeedback
from tests.layers.conftest import numpy


def test_state_halves_after_one_half_life_per_dimension():
    layer = DecayFeedback(control_dim=3, half_life=[10.0, 60.0, 3600.0])
    state = np.array([[1.0, -2.0, 4.0]], "float32")
    zero = np.zeros((1, 3), "float32")
    for i, half_life in enumerate([10.0, 60.0, 3600.0]):
        _, new_state = layer(zero, state=state, elapsed=half_life)
        np.testing.assert_allclose(numpy(new_state)[0, i], state[0, i] / 2, rtol=1e-6, atol=0)
    _, after_two = layer(zero, state=state, elapsed=np.array([20.0], "float32"))
    assert abs(numpy(after_two)[0, 0] - 0.25) <= 0.25 * 1e-6


def test_zero_elapsed_keeps_the_state_and_a_huge_one_forgets_it():
    layer = DecayFeedback(control_dim=2, half_life=5.0, neutral=[0.5, -0.5])
    state = np.array([[3.0, -7.0]], "float32")
    zero = np.zeros((1, 2), "float32")
    control, kept = layer(zero, state=state, elapsed=0.0)
    assert np.array_equal(numpy(kept), state)
    assert np.array_equal(numpy(control), state + np.array([0.5, -0.5], "float32"))
    for huge in [1e30, math.inf]:
        control, gone = layer(zero, state=state, elapsed=huge)
        assert np.array_equal(numpy(gone), np.zeros((1, 2), "float32"))
        assert np.array_equal(numpy(control), np.array([[0.5, -0.5]], "float32"))


def test_feedback_is_mapped_by_the_gain_and_a_zero_state_is_neutral():
    layer = DecayFeedback(control_dim=2, half_life=1.0, feedback_dim=3, neutral=0.25)
    layer.gain.assign([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    control, state = layer(np.array([[1.0, 2.0, 4.0]], "float32"))
    assert numpy(state).tolist() == [[5.0, -2.0]]
    assert numpy(control).tolist() == [[5.25, -1.75]]
    control, _ = layer(np.zeros((1, 3), "float32"), state=np.zeros((1, 2), "float32"), elapsed=3.0)
    assert numpy(control).tolist() == [[0.25, 0.25]]


def test_max_norm_bounds_the_control_not_the_state():
    layer = DecayFeedback(control_dim=2, half_life=1.0, max_norm=1.0)
    control, state = layer(np.array([[3.0, 4.0]], "float32"))
    assert numpy(state).tolist() == [[3.0, 4.0]]
    np.testing.assert_allclose(numpy(control), [[0.6, 0.8]], rtol=1e-6)
    small, _ = layer(np.array([[0.3, 0.4]], "float32"))
    np.testing.assert_allclose(numpy(small), [[0.3, 0.4]], rtol=1e-6)


def test_per_example_elapsed_and_state():
    layer = DecayFeedback(control_dim=1, half_life=1.0)
    state = np.array([[8.0], [8.0]], "float32")
    _, new_state = layer(np.zeros((2, 1), "float32"), state=state, elapsed=np.array([1.0, 3.0], "float32"))
    np.testing.assert_allclose(numpy(new_state), [[4.0], [1.0]], rtol=1e-6)


def test_stateful_step_and_reset():
    layer = DecayFeedback(control_dim=1, half_life=2.0, neutral=1.0)
    assert numpy(layer.step(np.array([4.0], "float32"))).tolist() == [5.0]
    np.testing.assert_allclose(numpy(layer.step(np.array([1.0], "float32"), elapsed=2.0)), [1.0 + 2.0 + 1.0], rtol=1e-6)
    np.testing.assert_allclose(numpy(layer.state), [3.0], rtol=1e-6)
    layer.reset()
    assert numpy(layer.state).tolist() == [0.0]
    assert numpy(layer.to_control(keras.ops.expand_dims(layer.state, 0)))[0].tolist() == [1.0]


def test_traced_in_a_model_matches_eager_and_the_half_life_can_learn():
    layer = DecayFeedback(control_dim=1, half_life=4.0, trainable_half_life=True, name="decay")
    f_in = keras.Input((1,), name="feedback")
    s_in = keras.Input((1,), name="state")
    dt_in = keras.Input((1,), name="elapsed")
    control, _ = layer(f_in, state=s_in, elapsed=dt_in)
    model = keras.Model([f_in, s_in, dt_in], control)
    f = np.zeros((4, 1), "float32")
    s = np.ones((4, 1), "float32")
    dt = np.array([[0.0], [2.0], [4.0], [8.0]], "float32")
    np.testing.assert_allclose(numpy(model.predict([f, s, dt], verbose=0))[:, 0], [1.0, 2**-0.5, 0.5, 0.25], rtol=1e-6)
    # Learn a half-life of 2: targets 2^(-dt / 2).
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit([f, s, dt], 2.0 ** (-dt / 2.0), epochs=150, verbose=0)
    assert abs(math.exp(numpy(layer.log_half_life)[0]) - 2.0) < 0.05
    assert [w.name for w in layer.trainable_weights] == ["gain", "log_half_life"]


def test_config_and_keras_file_round_trip(tmp_keras_path):
    layer = DecayFeedback(control_dim=2, half_life=[3.0, 9.0], feedback_dim=4, neutral=[0.0, 1.0], max_norm=2.0, name="fb")
    f_in, s_in = keras.Input((4,)), keras.Input((2,))
    control, new_state = layer(f_in, state=s_in, elapsed=1.5)
    model = keras.Model([f_in, s_in], [control, new_state])
    rng = np.random.default_rng(0)
    layer.gain.assign(rng.normal(size=(4, 2)).astype("float32"))
    f, s = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(3, 2)).astype("float32")
    expected = [numpy(t) for t in model.predict([f, s], verbose=0)]
    assert DecayFeedback.from_config(layer.get_config()).get_config() == layer.get_config()
    model.save(tmp_keras_path)
    loaded = keras.models.load_model(tmp_keras_path)
    for got, want in zip(loaded.predict([f, s], verbose=0), expected):
        assert np.array_equal(numpy(got), want)


def test_bad_inputs_name_the_argument_the_value_and_the_fix():
    layer = DecayFeedback(control_dim=2, half_life=1.0)
    f, s = np.zeros((1, 2), "float32"), np.ones((1, 2), "float32")
    with pytest.raises(ValueError, match=r"`elapsed` must be >= 0 .*Got elapsed=-1.0"):
        layer(f, state=s, elapsed=-1.0)
    with pytest.raises(ValueError, match="`elapsed` must be >= 0"):
        layer(f, state=s, elapsed=math.nan)
    for bad in [math.nan, math.inf]:
        with pytest.raises(ValueError, match="`feedback` contains NaN or inf"):
            layer(np.array([[0.0, bad]], "float32"), state=s, elapsed=1.0)
    with pytest.raises(ValueError, match="`state` contains NaN or inf"):
        layer(f, state=np.array([[math.inf, 0.0]], "float32"), elapsed=1.0)
    with pytest.raises(ValueError, match="feedback has width 3 .* feedback_dim=2"):
        layer(np.zeros((1, 3), "float32"))
    for half_life in [0.0, -2.0, math.inf, [1.0, 2.0, 3.0]]:
        with pytest.raises(ValueError, match="`half_life` must be one positive finite number or 2"):
            DecayFeedback(control_dim=2, half_life=half_life)
    with pytest.raises(ValueError, match="`max_norm` must be a positive number or None"):
        DecayFeedback(control_dim=2, half_life=1.0, max_norm=0)
    assert numpy(layer.state).tolist() == [0.0, 0.0]  # rejected inputs never touched the state


def test_max_norm_takes_numpy_numbers_and_refuses_non_finite():
    assert DecayFeedback(control_dim=1, half_life=2.0, max_norm=np.float32(1.5)).max_norm == 1.5
    for bad in (float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=f"`max_norm` must be a positive number or None. Got max_norm={bad}"):
            DecayFeedback(control_dim=1, half_life=2.0, max_norm=bad)
