"""Sharding on the JAX backend (keras.distribution.ModelParallel), and its refusal on TensorFlow.

sharded.py trains an injected tiny Llama unsharded and sharded over two host devices from the same
weights on the same batches. Tolerance 1e-6: the sharded matmuls sum their partial products in a
different order (measured: 2e-8).
"""

import contextlib
import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject
from keras_biasinject.distribute.sharding import model_parallel
from tests.rewrite.tiny_models import gpt2, out, snapshot, tokens

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded.py")


@pytest.mark.distributed
def test_sharded_jax_run_equals_the_unsharded_run(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = np.load(tmp_path / "run.npz")
    specs = json.loads((tmp_path / "run.json").read_text())
    # The base is sharded by KerasHub's Llama layout map; the adapters follow their kernels.
    assert specs["transformer_layer_0/self_attention/query/kernel"] == ["model", "batch", None]
    assert specs["transformer_layer_0/self_attention/query_lora_bias/lora_a"] == ["model", "batch", None]
    assert specs["transformer_layer_0/self_attention/query_lora_bias/control_kernel"] == [None, "batch", None]
    assert specs["transformer_layer_0/feedforward_output_dense_lora_bias/lora_a"] == ["model", None]
    assert specs["transformer_layer_0/feedforward_gate_dense_lora_bias/lora_b"] == [None, "model"]
    assert specs["transformer_layer_0/feedforward_gate_dense_lora_bias/control_gain"] == [None, None]
    plain = {k[len("plain:"):]: data[k] for k in data.files if k.startswith("plain:")}
    sharded = {k[len("sharded:"):]: data[k] for k in data.files if k.startswith("sharded:")}
    assert sorted(plain) == sorted(sharded) and len(plain) == 2 * 7 * 4
    for key in plain:
        np.testing.assert_allclose(sharded[key], plain[key], rtol=0, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(data["sharded_logits"], data["plain_logits"], rtol=0, atol=1e-6)
    assert max(np.abs(v).max() for k, v in plain.items() if k.endswith("lora_b")) > 1e-3  # the adapters did train
    # SmolLM2-like head counts that do not divide over the devices: those axes stay whole.
    assert specs["odd:transformer_layer_0/self_attention/attention_output/kernel"] == [None, None, "batch"]
    assert specs["odd:transformer_layer_0/self_attention/query/kernel"] == ["model", "batch", None]
    assert specs["odd:transformer_layer_0/self_attention/attention_output_lora_bias/lora_a"] == [None, None, None]
    np.testing.assert_allclose(data["odd_sharded"], data["odd_plain"], rtol=0, atol=1e-6)



def test_adapter_weights_of_every_kind_follow_their_kernel():
    # The layout rule alone, no JAX: each adapter class places its weights after the kernel's axes.
    from keras_biasinject.distribute.sharding import AdapterModelParallel

    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["block/attention/query/kernel"] = ("model", "batch", None)
    layout_map["block/ffw/kernel"] = (None, "model")
    distribution = AdapterModelParallel(layout_map=layout_map, batch_dim_name="batch")

    def layout_of(path, shape):
        *scopes, name = path.split("/")
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(keras.name_scope(scope))
            variable = keras.Variable(np.zeros(shape, "float32"), name=name)
        assert variable.path == path
        return list(distribution.get_variable_layout(variable).axes)

    assert layout_of("block/attention/query_bias_inject/control_kernel", (1, 4, 8)) == [None, "batch", None]
    assert layout_of("block/attention/query_lora_bias/lora_a", (16, 4, 2)) == ["model", "batch", None]
    assert layout_of("block/attention/query_lora_bias/lora_b", (2, 8)) == [None, None]
    assert layout_of("block/ffw_bias_inject/control_kernel", (1, 16)) == [None, "model"]
    assert layout_of("block/ffw_lora_bias/lora_b", (2, 16)) == [None, "model"]
    assert layout_of("block/ffw_lora_bias/control_gain", (1, 2)) == [None, None]
    assert layout_of("block/other_bias_inject/control_kernel", (1, 16)) == [None, None]  # its kernel is not in the map

def test_model_parallel_is_refused_on_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ValueError, match=r"only on the JAX backend; the backend is 'tensorflow'.*KERAS_BACKEND=jax.*mirrored"):
        model_parallel(keras_hub.models.LlamaBackbone)


def test_inject_refuses_a_distribution_tensorflow_would_ignore():
    backbone = gpt2()
    x = tokens()
    before, reference = snapshot(backbone), out(backbone, x)
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh)))
    try:
        with pytest.raises(ValueError, match=r"inject: a keras.distribution \(ModelParallel\) is set.*'tensorflow'.*silently does nothing"):
            inject(backbone)
    finally:
        keras.distribution.set_distribution(None)
    after = snapshot(backbone)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)
    np.testing.assert_array_equal(out(backbone, x), reference)
    assert "control" not in backbone.input and type(backbone) is keras_hub.models.GPT2Backbone


def test_finetune_refuses_it_before_writing_anything(tmp_path):
    from keras_biasinject.recipes import Recipe, finetune

    recipe = Recipe(data={"source": "small_fine_foods", "text_column": "review", "label_column": "label",
                          "control_map": {"great": 1.0, "other": 1.0}})
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=keras.distribution.LayoutMap(mesh)))
    try:
        with pytest.raises(ValueError, match=r"finetune: a keras.distribution \(ModelParallel\) is set.*KERAS_BACKEND=jax"):
            finetune(recipe, tmp_path / "run")
    finally:
        keras.distribution.set_distribution(None)
    assert not (tmp_path / "run").exists()
