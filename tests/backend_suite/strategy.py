"""`--strategy model-parallel` on whichever Keras backend this process runs (see families.py for how it is run).

On JAX, with 4 host devices (tests/test_backends.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4),
the strategy is a 2 x 2 (batch, model) mesh that really shards a tiny BERT's weights. On TensorFlow and
torch `make_strategy` and `kbi finetune` refuse it, naming the argument and the fix.
"""

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject
from keras_biasinject.cli.main import main
from keras_biasinject.distribute import make_strategy

BACKEND = keras.backend.backend()
RECIPE = """
task = "classification"
[model]
spec = "minilm-l6"
[data]
source = "small_fine_foods"
text_column = "review"
label_column = "label"
"""


def _spec(variable):
    spec = list(getattr(variable.value.sharding, "spec", ()))
    return spec + [None] * (len(variable.shape) - len(spec))


@pytest.mark.skipif(BACKEND == "jax", reason="JAX accepts model-parallel (the test below)")
def test_make_strategy_refuses_model_parallel_off_jax():
    with pytest.raises(ValueError, match=rf"strategy='model-parallel' \(kbi finetune --strategy model-parallel\) .* the Keras "
                                         rf"backend is '{BACKEND}'.*Run with KERAS_BACKEND=jax.*--strategy mirrored"):
        make_strategy("model-parallel")


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution shards only on JAX (refused: the test above)")
def test_model_parallel_is_a_2x2_mesh_that_shards_on_jax():
    strategy = make_strategy("model-parallel")
    assert dict(zip(strategy.device_mesh.axis_names, strategy.device_mesh.shape)) == {"batch": 2, "model": 2}
    assert strategy.num_replicas_in_sync == 2  # a global batch of 8 is 4 examples per data replica
    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
                                                 intermediate_dim=32, max_sequence_length=8)
        backbone = inject(backbone, rank=2)
    specs = {w.path: _spec(w) for w in backbone.weights}
    assert specs["transformer_layer_0/self_attention_layer/query/kernel"] == ["model", "batch", None]
    assert specs["transformer_layer_0/feedforward_intermediate_dense/kernel"] == ["batch", "model"]
    assert specs["transformer_layer_0/self_attention_layer/query_lora_bias/lora_a"] == ["model", "batch", None]
    x = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), "int32"), "segment_ids": np.zeros((2, 8), "int32")}
    with strategy.scope():
        assert np.isfinite(keras.ops.convert_to_numpy(backbone(x)["sequence_output"])).all()


@pytest.mark.skipif(BACKEND == "jax", reason="accepted on JAX: tests/test_backends.py runs kbi finetune with it")
def test_kbi_finetune_refuses_model_parallel_off_jax_before_writing(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert main(["finetune", str(recipe), "--out", str(out), "--strategy", "model-parallel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kbi finetune: error: strategy='model-parallel' (kbi finetune --strategy model-parallel)"), err
    assert "Run with KERAS_BACKEND=jax" in err and "\n" not in err
    assert not out.exists()  # refused before anything was written
