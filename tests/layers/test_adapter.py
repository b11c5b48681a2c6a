"""The interface every adapter kind shares (layers/adapter.py) and the table of kinds (layers/kinds.py)."""

import numpy as np
import pytest

from keras_biasinject.layers import ADAPTER_KINDS, BiasInjectDense, ControlAdapter, LoRABiasAdapter, adapter_weight
from tests.layers.conftest import PROJECTIONS, make_base, numpy

ADDED = {  # kind -> the weights its layer adds to the base, in creation order
    "lora_bias": ["lora_a", "lora_b", "control_gain", "control_kernel"],
    "bias": ["control_kernel"],
}


def make(kind, base):
    """An adapter of `kind` around `base`, its weights set to random non-zero values."""
    adapter = LoRABiasAdapter(base, rank=2, control_dim=2) if kind == "lora_bias" else BiasInjectDense.from_layer(base, control_dim=2)
    rng = np.random.default_rng(4)
    for weight in adapter.own_weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return adapter


def test_the_kinds_table():
    assert ADAPTER_KINDS == {"lora_bias": LoRABiasAdapter, "bias": BiasInjectDense}
    assert all(issubclass(cls, ControlAdapter) and cls.kind == kind for kind, cls in ADAPTER_KINDS.items())


@pytest.mark.parametrize("kind", sorted(ADDED))
def test_own_weights_are_exactly_the_added_weights(kind):
    base, _ = make_base("einsum_qkv")
    base_weights = list(base.weights)
    adapter = make(kind, base)
    own = adapter.own_weights
    assert [w.name for w in own] == ADDED[kind] == list(type(adapter).weight_names)
    assert [id(w) for w in own] == [id(getattr(adapter, name)) for name in ADDED[kind]]
    assert len(adapter.weights) == len(own) + len(base_weights)
    assert not {id(w) for w in own} & {id(w) for w in base_weights}
    assert not base.trainable and [w.name for w in adapter.trainable_weights] == ADDED[kind]  # freeze_base


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
@pytest.mark.parametrize("kind", sorted(ADDED))
def test_merged_weights_change_nothing_and_are_what_merge_writes(kind, projection):
    base, x = make_base(projection)
    adapter = make(kind, base)
    before = [numpy(w) for w in adapter.weights]
    c = np.array([0.7, -1.3], "float32")
    kernel, bias, offset = adapter.merged_weights(c)
    assert all(np.array_equal(numpy(w), v) for w, v in zip(adapter.weights, before))
    assert not adapter.merged
    if projection == "einsum_out":  # no bias: the control term stays an offset
        assert bias is None and tuple(offset.shape) == adapter.projection.feature_shape
    else:
        assert offset is None and not np.array_equal(numpy(bias), numpy(base.bias))
    assert np.array_equal(numpy(kernel), numpy(base.kernel)) == (kind == "bias")  # only LoRA changes the kernel

    adapter.merge(c)
    assert np.array_equal(numpy(base.kernel), numpy(kernel))
    if bias is not None:
        assert np.array_equal(numpy(base.bias), numpy(bias))
    adapter.unmerge()
    assert all(np.array_equal(numpy(w), v) for w, v in zip(adapter.weights, before))


def test_adapter_weight_maps_a_variable_path_to_its_kind_weight_and_kernel():
    assert adapter_weight("transformer_layer_0/self_attention/query_lora_bias/lora_a") == (
        LoRABiasAdapter, "lora_a", "transformer_layer_0/self_attention/query/kernel"
    )
    assert adapter_weight("transformer_layer_1/ffw_linear_bias_inject/control_kernel") == (
        BiasInjectDense, "control_kernel", "transformer_layer_1/ffw_linear/kernel"
    )
    assert adapter_weight("dense_lora_bias/control_gain") == (LoRABiasAdapter, "control_gain", "dense/kernel")
    for path in [
        "transformer_layer_0/self_attention/query/kernel",  # a base weight
        "block/query_bias_inject/lora_a",  # a weight the bias kind does not have
        "block/query_lora_bias/kernel",
        "block/_lora_bias/lora_a",  # no base name
        "lora_a",
    ]:
        assert adapter_weight(path) is None, path
    for kind in sorted(ADDED):  # the paths the adapters' weights really get
        base, _ = make_base("einsum_qkv")
        adapter = make(kind, base)
        assert [adapter_weight(w.path) for w in adapter.own_weights] == [
            (type(adapter), w.name, base.kernel.path) for w in adapter.own_weights
        ]


def test_weight_layouts_follow_the_kernel():
    qkv = ["model", "batch", None]  # KerasHub's Llama map for query: [hidden, heads, head_dim]
    assert LoRABiasAdapter.weight_layout("lora_a", qkv, 3) == ["model", "batch", None]
    assert LoRABiasAdapter.weight_layout("lora_b", qkv, 2) == [None, None]
    assert LoRABiasAdapter.weight_layout("control_gain", qkv, 2) == [None, None]
    for cls in (LoRABiasAdapter, BiasInjectDense):
        assert cls.weight_layout("control_kernel", qkv, 3) == [None, "batch", None]  # [k, heads, head_dim]
        assert cls.weight_layout("control_kernel", [None, "model"], 2) == [None, "model"]  # Dense [in, out]
        assert cls.weight_layout("control_kernel", [None, None, "batch"], 2) == [None, "batch"]  # [heads, head_dim, hidden]



@pytest.mark.parametrize("kind", sorted(ADDED))
def test_tokens_flattened_to_rows_take_their_examples_controls(kind):
    """MoE routers and shared experts see [batch * seq, features]: a per-example control repeats over each
    example's tokens and a per-token control flattens alike, as if the layer saw [batch, seq, features]."""
    import keras

    base = keras.layers.Dense(3)
    adapter = make(kind, base) if base.build((None, 4)) is None else None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4)).astype("float32")  # (B, T, H)
    flat = x.reshape(10, 4)  # (B*T, H), batch-major
    for c in [rng.normal(size=(2, 2)).astype("float32"), rng.normal(size=(2, 5, 2)).astype("float32")]:
        expected = numpy(adapter(x, control=c)).reshape(10, 3)
        np.testing.assert_allclose(numpy(adapter(flat, control=c)), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"control has shape \(2, 4, 2\) \(per token\), but this layer sees 10 rows, not batch x seq = 8"):
        adapter(flat, control=rng.normal(size=(2, 4, 2)).astype("float32"))
    with pytest.raises(ValueError, match=r"control has shape \(3, 2\) \(per example\), but this layer sees 10 rows, which is not"):
        adapter(flat, control=rng.normal(size=(3, 2)).astype("float32"))
