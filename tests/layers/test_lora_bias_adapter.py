import keras
import numpy as np
import pytest
from keras import ops

from keras_biasinject import LoRABiasAdapter, control_scope
from tests.layers.conftest import BATCH, POLICIES, PROJECTIONS, controls, fit_steps, make_base, numpy

ADAPTER_WEIGHTS = ["lora_a", "lora_b", "control_gain", "control_kernel"]


def weights_by_name(layer):
    return {w.name: numpy(w) for w in layer.weights}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("gate", ["always", "control"])
@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_output_is_exactly_the_base_at_insertion(kind, gate, policy):
    base, x = make_base(kind, dtype=policy)
    expected = numpy(base(x))
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, gate=gate)
    for name, c in controls(2).items():
        assert np.array_equal(numpy(adapter(x, control=c)), expected), name
    assert np.array_equal(numpy(adapter(x)), expected)
    assert adapter.compute_dtype == base.compute_dtype


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_control_gate_is_an_exact_off_switch_after_training(kind):
    base, x = make_base(kind)
    base_before = weights_by_name(base)
    expected = numpy(base(x))
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, gate="control")
    c = controls(2)["per_example"]
    initial = weights_by_name(adapter)
    fit_steps(adapter, x, c, steps=5)

    trained = weights_by_name(adapter)
    for name in ADAPTER_WEIGHTS:  # every adapter weight moved
        assert not np.array_equal(trained[name], initial[name]), name
    for name, value in weights_by_name(base).items():  # the frozen base did not
        assert np.array_equal(value, base_before[name]), name

    neutral = np.zeros((BATCH, 2), "float32")
    assert np.array_equal(numpy(adapter(x, control=neutral)), expected)
    assert np.array_equal(numpy(adapter(x)), expected)
    assert np.max(np.abs(numpy(adapter(x, control=c)) - expected)) > 1e-3


@pytest.mark.parametrize("gate", ["always", "control"])
def test_first_step_moves_the_zero_initialised_weights(gate):
    base, x = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, gate=gate)
    c = controls(2)["per_token"]
    # One plain SGD step: a weight moves exactly when its gradient is non-zero.
    fit_steps(adapter, x, c, steps=1, optimizer=keras.optimizers.SGD(0.1))
    for name in ["lora_b", "control_kernel"]:
        value = weights_by_name(adapter)[name]
        assert np.count_nonzero(value) == value.size, name


def test_only_adapter_weights_are_trainable():
    base, _ = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=2, control_dim=1)
    assert sorted(w.name for w in adapter.trainable_weights) == sorted(ADAPTER_WEIGHTS)
    assert sorted(w.name for w in adapter.non_trainable_weights) == ["bias", "kernel"]
    assert not base.trainable


def test_hand_computed_dense_update():
    base = keras.layers.Dense(1, use_bias=False)
    base.build((1, 2))
    base.kernel.assign([[1.0], [2.0]])
    adapter = LoRABiasAdapter(base, rank=1, control_dim=1, alpha=2.0, gate="always", neutral=0.5)
    adapter.lora_a.assign([[1.0], [1.0]])
    adapter.lora_b.assign([[3.0]])
    adapter.control_gain.assign([[2.0]])
    adapter.control_kernel.assign([[10.0]])
    x = np.array([[1.0, 1.0]], "float32")
    # base 3; xA = 2; d = 1.5 - 0.5 = 1; strength 1 + 1*2 = 3; (2/1) * 2 * 3 * 3 = 36; dV = 10.
    assert numpy(adapter(x, control=np.array([[1.5]], "float32"))).tolist() == [[3.0 + 36.0 + 10.0]]
    assert numpy(adapter(x)).tolist() == [[3.0 + 2.0 * 2.0 * 3.0]]  # neutral: strength 1



@pytest.mark.parametrize("kind", ["einsum_qkv", "einsum_out"])
@pytest.mark.parametrize("gate", ["always", "control"])
def test_einsum_update_matches_the_formula_in_float64_with_known_and_unknown_sequence_length(kind, gate):
    """`x A` runs as one 2-D matmul when the sequence length is known and as the einsum when it is not;
    both give `base + ((x A) * (g + c U)) B + c V`, computed here in float64 with numpy's einsum."""
    base, x = make_base(kind)
    adapter = LoRABiasAdapter(base, rank=3, control_dim=2, gate=gate)
    rng = np.random.default_rng(3)
    values = {w.name: rng.normal(size=w.shape).astype("float32") for w in adapter.own_weights}
    for w in adapter.own_weights:
        w.assign(values[w.name])
    c = controls(2)["per_example"]
    a, b, u, v = (values[n].astype("float64") for n in ADAPTER_WEIGHTS)
    x64 = x.astype("float64")
    h = np.einsum("btc,cdr->btdr", x64, a) if kind == "einsum_qkv" else np.einsum("btcd,cdr->btr", x64, a)
    strength = (1.0 if gate == "always" else 0.0) + c.astype("float64") @ u  # (B, r)
    gated = h * (strength[:, None, None, :] if kind == "einsum_qkv" else strength[:, None, :])
    update = gated @ b + np.einsum("bz,z...->b...", c.astype("float64"), v)[:, None]
    expected = numpy(base(x)) + update
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(numpy(adapter(x, control=c)), expected, rtol=0, atol=1e-5 * scale)
    if keras.backend.backend() != "tensorflow":  # jax.jit and torch always see concrete shapes: no unknown length
        return
    import tensorflow as tf

    def traced(seq):
        return tf.function(lambda x, c: adapter(x, control=c),
                           input_signature=[tf.TensorSpec((None, seq) + x.shape[2:]), tf.TensorSpec((None, 2))])

    def einsums(call):
        return sum(op.type == "Einsum" for op in call.get_concrete_function().graph.get_operations())

    call = traced(None)
    assert einsums(call) == einsums(traced(x.shape[1])) + 2  # the base's and `x A`: einsums, not matmuls
    np.testing.assert_allclose(numpy(call(x, c)), expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
@pytest.mark.parametrize("gate", ["always", "control"])
def test_merge_matches_the_dynamic_control_and_unmerge_is_exact(kind, gate):
    base, x = make_base(kind)
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, gate=gate)
    fit_steps(adapter, x, controls(2)["per_example"], steps=3)
    kernel, bias = numpy(base.kernel), None if base.bias is None else numpy(base.bias)
    c = np.array([0.7, -1.3], "float32")
    dynamic = numpy(adapter(x, control=np.tile(c, (BATCH, 1))))

    adapter.merge(c)
    merged = numpy(adapter(x))
    scale = np.max(np.abs(dynamic))
    np.testing.assert_allclose(merged, dynamic, rtol=0, atol=1e-5 * scale)
    assert not np.array_equal(numpy(base.kernel), kernel)
    with pytest.raises(ValueError, match="merged for one fixed control"):
        adapter(x, control=np.tile(c, (BATCH, 1)))
    with pytest.raises(ValueError, match="already merged"):
        adapter.merge(c)

    adapter.unmerge()
    assert np.array_equal(numpy(base.kernel), kernel)
    if bias is not None:
        assert np.array_equal(numpy(base.bias), bias)
    assert np.array_equal(numpy(adapter(x, control=np.tile(c, (BATCH, 1)))), dynamic)
    with pytest.raises(ValueError, match="not merged"):
        adapter.unmerge()


def test_per_example_controls_equal_separate_calls():
    base, x = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2)
    fit_steps(adapter, x, controls(2)["per_example"], steps=3)
    c = controls(2, seed=5)["per_example"]
    together = numpy(adapter(x, control=c))
    for i in range(BATCH):
        alone = numpy(adapter(x[i : i + 1], control=c[i : i + 1]))
        np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-6, atol=1e-6)


def test_per_token_control_broadcasts_a_per_example_one():
    base, x = make_base("einsum_out")
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2)
    fit_steps(adapter, x, controls(2)["per_example"], steps=3)
    c = controls(2)["per_example"]
    per_token = np.repeat(c[:, None, :], x.shape[1], axis=1)
    np.testing.assert_allclose(numpy(adapter(x, control=c)), numpy(adapter(x, control=per_token)), rtol=1e-6, atol=1e-6)


def test_control_scope_reaches_the_adapter():
    base, x = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, gate="control")
    c = controls(2)["per_example"]
    fit_steps(adapter, x, c, steps=3)
    with control_scope(c):
        scoped = numpy(adapter(x))
    assert np.array_equal(scoped, numpy(adapter(x, control=c)))
    assert np.array_equal(numpy(adapter(x)), numpy(base(x)))  # outside the scope: neutral


def test_config_and_keras_file_round_trip(tmp_keras_path):
    base, x = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=4, control_dim=2, alpha=8, gate="control", neutral=[0.5, -0.5], name="q_adapter")
    c = controls(2)["per_example"]
    model = fit_steps(adapter, x, c, steps=3)
    expected = numpy(model.predict([x, c], verbose=0))

    clone = LoRABiasAdapter.from_config(adapter.get_config())
    assert clone.get_config() == adapter.get_config()

    model.save(tmp_keras_path)
    loaded = keras.models.load_model(tmp_keras_path)
    assert np.array_equal(numpy(loaded.predict([x, c], verbose=0)), expected)
    reloaded = loaded.get_layer("q_adapter")
    assert isinstance(reloaded, LoRABiasAdapter) and not reloaded.base_layer.trainable
    assert sorted(w.name for w in reloaded.trainable_weights) == sorted(ADAPTER_WEIGHTS)


def test_saving_while_merged_is_refused(tmp_keras_path):
    base, x = make_base("dense_gelu")
    adapter = LoRABiasAdapter(base, rank=2, control_dim=1)
    model = fit_steps(adapter, x, controls(1)["per_example"], steps=1)
    adapter.merge([1.0])
    with pytest.raises(ValueError, match="Call `unmerge\\(\\)` before saving"):
        model.save(tmp_keras_path)


def test_bad_arguments_name_the_argument_the_value_and_the_fix():
    base, x = make_base("einsum_qkv")
    with pytest.raises(ValueError, match="Conv1D.*Wrap the projection"):
        conv = keras.layers.Conv1D(4, 3)
        conv.build((None, 8, 4))
        LoRABiasAdapter(conv, rank=2, control_dim=1)
    with pytest.raises(ValueError, match="not built"):
        LoRABiasAdapter(keras.layers.Dense(4), rank=2, control_dim=1)
    for rank in [0, -1, 2.5]:
        with pytest.raises(ValueError, match=f"`rank` must be a positive integer. Got rank={rank}"):
            LoRABiasAdapter(base, rank=rank, control_dim=1)
    with pytest.raises(ValueError, match="`gate` must be one of"):
        LoRABiasAdapter(base, rank=2, control_dim=1, gate="sometimes")
    with pytest.raises(ValueError, match="`neutral` has 3 entries but control_dim=2"):
        LoRABiasAdapter(base, rank=2, control_dim=2, neutral=[0.0, 0.0, 0.0])
    assert base.trainable  # failed wraps left the layer untouched

    adapter = LoRABiasAdapter(base, rank=2, control_dim=2)
    with pytest.raises(ValueError, match="control has width 3 .* control_dim=2"):
        adapter(x, control=np.zeros((BATCH, 3), "float32"))
    with pytest.raises(ValueError, match="control has shape"):
        adapter(x, control=np.zeros((BATCH, 5, 1, 2), "float32"))


def test_keras_lora_and_unsupported_equations_are_refused():
    base, _ = make_base("dense_gelu")
    base.enable_lora(2)
    with pytest.raises(ValueError, match="already has Keras LoRA enabled"):
        LoRABiasAdapter(base, rank=2, control_dim=1)
    odd = keras.layers.EinsumDense("abc,cd->adb", (4, None))
    odd.build((2, 5, 16))
    with pytest.raises(ValueError, match="equation 'abc,cd->adb'"):
        LoRABiasAdapter(odd, rank=2, control_dim=1)


def test_quantized_base_works_unmerged_and_refuses_merge():
    base = keras.layers.Dense(8)
    base.build((None, 16))
    x = np.random.default_rng(0).normal(size=(BATCH, 16)).astype("float32")
    base.quantize("int8")
    expected = numpy(base(x))
    adapter = LoRABiasAdapter(base, rank=2, control_dim=1)
    c = controls(1)["per_example"]
    assert np.array_equal(numpy(adapter(x, control=c)), expected)
    fit_steps(adapter, x, c, steps=2)
    assert not np.array_equal(numpy(adapter(x, control=c)), expected)
    with pytest.raises(ValueError, match="quantized"):
        adapter.merge([1.0])
    assert ops.convert_to_numpy(base._kernel).dtype == np.int8


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0.0, True])
def test_non_finite_alpha_is_refused_also_from_a_tampered_config(alpha):
    base, _ = make_base("dense_gelu")
    with pytest.raises(ValueError, match=f"`alpha` must be a positive number or None. Got alpha={alpha}"):
        LoRABiasAdapter(base, rank=2, control_dim=1, alpha=alpha)
    config = LoRABiasAdapter(base, rank=2, control_dim=1).get_config()
    with pytest.raises(ValueError, match="`alpha` must be a positive number or None"):
        LoRABiasAdapter.from_config({**config, "alpha": alpha})  # as a hand-edited .keras config


def test_numpy_numbers_are_accepted_and_bools_refused():
    base, x = make_base("dense_gelu")
    adapter = LoRABiasAdapter(base, rank=np.int64(2), control_dim=np.int32(1), alpha=np.float32(4))
    assert type(adapter.rank) is int and adapter.scale == 2.0
    base, _ = make_base("dense_gelu")
    with pytest.raises(ValueError, match="`neutral` must be finite: a float or a list of floats, not a bool"):
        LoRABiasAdapter(base, rank=2, control_dim=1, neutral=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_concrete_non_finite_control_raises_and_a_traced_one_is_not_read(bad):
    base, x = make_base("einsum_qkv")
    adapter = LoRABiasAdapter(base, rank=2, control_dim=1, gate="control")
    c = controls(1)["per_example"].copy()
    c[0, 0] = bad
    for control in (c, ops.convert_to_tensor(c), c[0]):
        with pytest.raises(ValueError, match="the control contains NaN or inf .* pass finite control values"):
            adapter(x, control=control)
    with pytest.raises(ValueError, match="the control contains NaN or inf"):
        with control_scope(c):
            adapter(x)
    # Symbolic controls (a functional model being built) have no values: no check, no error.
    x_in, control_in = keras.Input(x.shape[1:]), keras.Input((1,))
    model = keras.Model([x_in, control_in], adapter(x_in, control=control_in))
    if keras.backend.backend() == "torch":  # torch runs predict eagerly: the control is concrete, so it is read
        with pytest.raises(ValueError, match="the control contains NaN or inf"):
            model.predict([x, c], verbose=0)
    else:
        assert np.isnan(numpy(model.predict([x, c], verbose=0))[0]).all()  # traced inside predict: not read
