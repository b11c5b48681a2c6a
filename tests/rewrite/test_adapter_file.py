import json
import os

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject, load_adapter, save_adapter
from tests.rewrite.tiny_models import controls, gpt2, out, state_of, tokens, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained injected GPT-2 LM with two named controls, saved as an adapter folder."""
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4, control_dim=2)
    x = tokens()
    train(lm, {**x, "control": controls(2)[0]})
    lm.add_control("positive", [1.0, 0.5])
    lm.add_control("negative", [-1.0, -0.5])
    path = save_adapter(lm, tmp_path_factory.mktemp("adapters") / "demo")
    return lm, path


def fresh_lm():
    return keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)


def test_adapter_holds_only_new_weights_and_reloads_exactly(trained):
    lm, path = trained
    names = sorted(os.listdir(path))
    assert names == ["adapter_config.json", "adapter_weights.safetensors"]
    config = json.loads(open(os.path.join(path, "adapter_config.json")).read())
    assert all("_lora_bias/" in p for p in config["weights"]) and len(config["weights"]) == 16
    adapter_bytes = os.path.getsize(os.path.join(path, "adapter_weights.safetensors"))
    adapter_params = sum(int(np.prod(s)) for s in config["weights"].values())
    assert adapter_params == lm.injection.trainable_params
    assert adapter_bytes < 4 * adapter_params + 4096  # float32 weights plus a small header: no base weights
    assert config["named_controls"] == {"positive": [1.0, 0.5], "negative": [-1.0, -0.5]}

    loaded = load_adapter(fresh_lm(), path)
    x = tokens()
    for c in controls(2, seed=5) + ["positive", ["positive", "negative", "positive"]]:
        assert np.array_equal(out(loaded, {**x, "control": c}), out(lm, {**x, "control": c}))
    assert loaded.named_controls == lm.named_controls
    assert [w.trainable for w in loaded.weights] == [w.trainable for w in lm.weights]


def test_named_controls_select_per_request(trained):
    lm, _ = trained
    x = tokens()
    named = out(lm, {**x, "control": ["positive", "negative", "positive"]})
    vectors = np.array([[1.0, 0.5], [-1.0, -0.5], [1.0, 0.5]], "float32")
    assert np.array_equal(named, out(lm, {**x, "control": vectors}))
    assert np.array_equal(out(lm, {**x, "control": "negative"}), out(lm, {**x, "control": vectors[1]}))
    for i, name in enumerate(["positive", "negative", "positive"]):
        alone = out(lm, {"token_ids": x["token_ids"][i : i + 1], "padding_mask": x["padding_mask"][i : i + 1], "control": [name]})
        np.testing.assert_allclose(named[i : i + 1], alone, rtol=1e-5, atol=1e-5)  # batched vs single-row matmuls
    with pytest.raises(ValueError, match=r"Unknown named control\(s\) \['formal'\]. Stored names: \['negative', 'positive'\]"):
        lm({**x, "control": "formal"})
    with pytest.raises(ValueError, match=r"control 'bad' must be 2 number\(s\) \(control_dim=2\). Got \[1.0\]"):
        lm.add_control("bad", [1.0])
    with pytest.raises(ValueError, match="control 'nan' must be finite"):
        lm.add_control("nan", [float("nan"), 0.0])
    assert sorted(lm.named_controls) == ["negative", "positive"]


def test_named_controls_survive_whole_model_save(trained, tmp_path):
    lm, _ = trained
    lm.save(tmp_path / "lm.keras")
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    assert loaded.named_controls == lm.named_controls
    x = tokens()
    assert np.array_equal(out(loaded, {**x, "control": "positive"}), out(lm, {**x, "control": "positive"}))


def test_generate_with_a_named_control(trained):
    lm, _ = trained
    lm.compile(sampler="greedy")
    prompt = tokens(batch=2)
    prompt["padding_mask"][:, 3:] = 0
    by_name = lm.generate(dict(prompt), stop_token_ids=None, control="positive")
    by_vector = lm.generate(dict(prompt), stop_token_ids=None, control=np.array([[1.0, 0.5]] * 2, "float32"))
    assert np.array_equal(keras.ops.convert_to_numpy(by_name["token_ids"]), keras.ops.convert_to_numpy(by_vector["token_ids"]))


def test_mismatched_base_is_refused_and_left_unchanged(trained):
    _, path = trained
    keras.utils.set_random_seed(0)
    other = keras_hub.models.GPT2CausalLM(
        backbone=keras_hub.models.GPT2Backbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=24, intermediate_dim=32, max_sequence_length=8),
        preprocessor=None,
    )
    before = state_of(other)
    with pytest.raises(ValueError, match=r"does not match the adapter at .*hidden_dim: adapter 16, model 24"):
        load_adapter(other, path)
    after = state_of(other)
    assert after[0] is before[0] and after[2] == before[2] and after[3] == before[3]
    assert all(np.array_equal(after[1][p], v) for p, v in before[1].items())

    # An adapter saved from a task loads into its backbone alone (no extra trainable layers here).
    lm, _ = trained
    backbone = load_adapter(gpt2(), path)
    assert isinstance(backbone, keras_hub.models.GPT2Backbone)
    x = tokens()
    assert np.array_equal(out(backbone, {**x, "control": "positive"}), out(lm.backbone, {**x, "control": "positive"}))


def test_a_tampered_adapter_is_refused_and_the_base_left_unchanged(trained, tmp_path):
    lm, _ = trained
    path = tmp_path / "rank2"
    small = inject(fresh_lm(), rank=2, control_dim=2)
    save_adapter(small, path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["injection"]["rank"] = 4  # the weights are rank 2
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = fresh_lm()
    x = tokens()
    expected = out(base, x)
    before = state_of(base)
    with pytest.raises(ValueError, match=r"weight '.*lora_a' has shape \(16, 2, 2\) in .*; the model needs \(16, 2, 4\)"):
        load_adapter(base, path)
    after = state_of(base)
    assert type(base) is keras_hub.models.GPT2CausalLM and after[2] == before[2] and after[3] == before[3]
    assert set(after[1]) == set(before[1]) and np.array_equal(out(base, x), expected)


def test_different_base_weights_warn(trained):
    _, path = trained
    base = fresh_lm()
    base.backbone.transformer_layers[0]._self_attention_layer._query_dense.kernel.assign(
        np.zeros((16, 2, 8), "float32"))
    with pytest.warns(UserWarning, match="base weights under the adapted layers differ"):
        load_adapter(base, path)


def test_save_is_atomic_and_never_overwrites_silently(trained, tmp_path):
    lm, path = trained
    with pytest.raises(FileExistsError, match="exists. Pass overwrite=True"):
        save_adapter(lm, path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an adapter folder; it is never replaced"):
        save_adapter(lm, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    target = tmp_path / "a"
    save_adapter(lm, target)
    lm.add_control("third", [0.0, 1.0])
    try:
        save_adapter(lm, target, overwrite=True)
    finally:
        del lm.named_controls["third"]
    assert "third" in json.loads((target / "adapter_config.json").read_text())["named_controls"]
    assert sorted(os.listdir(tmp_path)) == ["a", "notes"]  # no temporary folders left behind
    with pytest.raises(FileNotFoundError, match="is not an adapter folder"):
        load_adapter(fresh_lm(), tmp_path / "notes")


def test_plain_models_are_refused():
    with pytest.raises(ValueError, match="expected a model returned by `inject`; got a plain GPT2CausalLM"):
        save_adapter(fresh_lm(), "unused")
