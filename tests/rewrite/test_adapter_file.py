import json
import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

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
    with pytest.raises(ValueError, match=r"key 'injection.rank' is 4, but key 'weights\..*lora_a' lists shape \[16, 2, 2\]"):
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


# --- Tampered adapter folders: each refused with a ValueError naming the file and the key or tensor,
# and the base model left exactly as it was. Every case edits a copy of the `trained` adapter.

CONFIG, WEIGHTS = "adapter_config.json", "adapter_weights.safetensors"


def edit_config(change):
    def tamper(folder):
        config = json.loads((folder / CONFIG).read_text())
        change(config)
        (folder / CONFIG).write_text(json.dumps(config))  # json writes NaN and inf as NaN, Infinity
    return tamper


def raw_config(data):
    return lambda folder: (folder / CONFIG).write_bytes(data)


def edit_weights(change):
    def tamper(folder):
        arrays = load_file(str(folder / WEIGHTS))
        change(arrays)
        save_file(arrays, str(folder / WEIGHTS))
    return tamper


def raw_weights(cut):
    return lambda folder: (folder / WEIGHTS).write_bytes(cut((folder / WEIGHTS).read_bytes()))


def first(d):
    return sorted(d)[0]


def set_first_tensor(make):
    return edit_weights(lambda a: a.update({first(a): make(a[first(a)])}))


def set_injection(**fields):
    return edit_config(lambda c: c["injection"].update(fields))


def add_tensor_to_both(folder):  # consistent file, but not this model's weights
    edit_weights(lambda a: a.update({"extra/kernel": np.zeros(2, "float32")}))(folder)
    edit_config(lambda c: c["weights"].update({"extra/kernel": [2]}))(folder)


TAMPERED = {
    "no base_fingerprint": (edit_config(lambda c: c.pop("base_fingerprint")), CONFIG, r"missing key\(s\) \['base_fingerprint'\]"),
    "extra key": (edit_config(lambda c: c.update(surprise=1)), CONFIG, r"unexpected key\(s\) \['surprise'\]"),
    "rank as a string": (set_injection(rank="2"), CONFIG, r"key 'injection' is not a valid InjectionConfig: .*rank"),
    "rank as a list": (set_injection(rank=[2]), CONFIG, r"key 'injection' is not a valid InjectionConfig: .*rank"),
    "alpha as a string": (set_injection(alpha="big"), CONFIG, r"key 'injection' is not a valid InjectionConfig: .*alpha"),
    "alpha Infinity": (set_injection(alpha=float("inf")), CONFIG, r"key 'injection.alpha' must be a finite number. Got inf"),
    "alpha 1e999": (raw_config(b'{"injection": {"alpha": 1e999}}'), CONFIG, r"key 'injection.alpha' must be a finite number"),
    "NaN named control": (edit_config(lambda c: c["named_controls"].update(positive=[float("nan"), 0.0])), CONFIG,
                          r"key 'named_controls.positive.0' must be a finite number. Got nan"),
    "short named control": (edit_config(lambda c: c["named_controls"].update(positive=[1.0])), CONFIG,
                            r"'named_controls.positive' must be 2 number\(s\) \(control_dim=2\). Got \[1.0\]"),
    "string named control": (edit_config(lambda c: c["named_controls"].update(positive="up")), CONFIG, r"'named_controls.positive'.*Got 'up'"),
    "injection a list": (edit_config(lambda c: c.update(injection=[4])), CONFIG, r"key 'injection' must be a JSON object. Got \[4\]"),
    "targets a number": (set_injection(targets=5), CONFIG, r"key 'injection' is not a valid InjectionConfig"),
    "unknown injection key": (set_injection(colour="red"), CONFIG, r"key 'injection' is not a valid InjectionConfig: .*colour"),
    "fingerprint a number": (edit_config(lambda c: c.update(base_fingerprint=5)), CONFIG, r"key 'base_fingerprint' must be a JSON string. Got 5"),
    "fingerprint not hex": (edit_config(lambda c: c.update(base_fingerprint="x")), CONFIG, r"'base_fingerprint' must be a sha256 hex digest"),
    "shape as strings": (edit_config(lambda c: c["weights"].update({first(c["weights"]): ["16"]})), CONFIG, r"key 'weights\..*' must be a shape"),
    "other format": (edit_config(lambda c: c.update(format="peft/0")), CONFIG, r"has format 'peft/0'; this version reads"),
    "bad feedback head": (edit_config(lambda c: c.update(feedback_head={"class_name": "Nope", "config": {}})), CONFIG,
                          r"key 'feedback_head' does not describe a FeedbackHead"),
    "not UTF-8": (raw_config(b'{"format": "\xff\xfe"}'), CONFIG, r"is not UTF-8 text \(byte 12\)"),
    "invalid JSON": (raw_config(b'{"format": '), CONFIG, r"is not valid JSON"),
    "5,000-digit number": (raw_config(b'{"a": 1' + b"0" * 5000 + b"}"), CONFIG, r"is not valid JSON"),
    "nested 100,000 deep": (raw_config(b"[" * 100_000 + b"]" * 100_000), CONFIG, r"nests its JSON too deeply"),
    "a JSON list": (raw_config(b"[]"), CONFIG, r"must hold a JSON object; got a list"),
    "weights missing": (lambda folder: (folder / WEIGHTS).unlink(), WEIGHTS, r"is missing"),
    "weights truncated": (raw_weights(lambda b: b[: len(b) // 2]), WEIGHTS, r"is truncated or corrupt"),
    "weights empty": (raw_weights(lambda b: b""), WEIGHTS, r"is truncated or corrupt"),
    "weights header garbage": (raw_weights(lambda b: b"\xff" * 8 + b[8:]), WEIGHTS, r"is truncated or corrupt"),
    "a tensor missing": (edit_weights(lambda a: a.pop(first(a))), WEIGHTS, r"lacks tensor\(s\) \['.*control_gain'\] and has unexpected tensor\(s\) \[\]"),
    "an extra tensor": (edit_weights(lambda a: a.update(x=np.zeros(2, "float32"))), WEIGHTS, r"has unexpected tensor\(s\) \['x'\]"),
    "a wrong shape": (set_first_tensor(lambda t: t[:1]), WEIGHTS, r"tensor '.*control_gain' has shape \[1, 4\];.*lists \[2, 4\]"),
    "int32 tensor": (set_first_tensor(lambda t: t.astype("int32")), WEIGHTS, r"tensor '.*control_gain' has dtype int32; .*never cast"),
    "bool tensor": (set_first_tensor(lambda t: t != 0), WEIGHTS, r"tensor '.*control_gain' has dtype bool"),
    "float64 tensor": (set_first_tensor(lambda t: t.astype("float64")), WEIGHTS, r"has dtype float64"),
    "NaN tensor": (set_first_tensor(lambda t: np.where(np.arange(t.size).reshape(t.shape) == 3, np.nan, t).astype("float32")), WEIGHTS,
                   r"tensor '.*control_gain' holds NaN or inf values"),
    "inf tensor": (set_first_tensor(lambda t: np.full_like(t, np.inf)), WEIGHTS, r"tensor '.*control_gain' holds NaN or inf"),
    "a tensor this model lacks": (add_tensor_to_both, "", r"do not fit this model: missing \[\], unexpected \['extra/kernel'\]"),
    "targets the model lacks": (set_injection(targets="no_such_layer"), CONFIG, r"'injection' in .* does not apply to this model"),
    # integers beyond the float range (`float()` raises OverflowError): a ValueError naming the key
    "alpha of 400 digits": (set_injection(alpha=10**399), CONFIG, r"key 'injection.alpha' must be a finite number. Got an integer of 400 digits"),
    "neutral of 400 digits": (set_injection(neutral=[10**399, 0.0]), CONFIG, r"key 'injection.neutral.0' must be a finite number"),
    "named control of 400 digits": (edit_config(lambda c: c["named_controls"].update(positive=[1.0, -(10**399)])), CONFIG,
                                    r"key 'named_controls.positive.1' must be a finite number. Got an integer of 400 digits"),
    # fields that size the adapter weights, checked against the listed shapes before `inject` allocates
    "rank 10**6": (set_injection(rank=10**6), CONFIG, r"key 'injection.rank' is 1000000, but key 'weights\..*/lora_a' lists shape \[16, 2, 4\]"),
    "control_dim 10**6": (edit_config(lambda c: (c["injection"].update(control_dim=10**6), c["named_controls"].clear())), CONFIG,
                          r"key 'injection.control_dim' is 1000000, but key 'weights\..*' lists shape \[2, "),
    "another kind": (set_injection(kind="bias"), CONFIG, r"key 'injection.kind' is 'bias', but key 'weights' lists .*of kind 'lora_bias'"),
    "no adapter weight listed": (edit_config(lambda c: c.update(weights={})), CONFIG,
                                 r"key 'weights' lists no weight of an adapter of kind 'lora_bias', so 'injection.control_dim' cannot"),
}


@pytest.fixture(scope="module")
def untouched():
    """One base model shared by every tampered case, and its state before any of them."""
    base = fresh_lm()
    return base, state_of(base)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_every_tampered_adapter_is_refused_before_the_model_changes(trained, untouched, tmp_path, case):
    tamper, file, pattern = TAMPERED[case]
    folder = tmp_path / "adapter"
    shutil.copytree(trained[1], folder)
    tamper(folder)
    base, before = untouched
    with pytest.raises(ValueError, match=pattern) as raised:
        load_adapter(base, folder)
    assert str(folder / file) in str(raised.value)  # names the file
    after = state_of(base)
    assert after[0] is before[0] and after[2] == before[2] and after[3] == before[3]  # not injected, same layers
    assert set(after[1]) == set(before[1]) and all(np.array_equal(after[1][p], v) for p, v in before[1].items())


def test_saved_files_follow_the_umask(trained, tmp_path):
    lm, _ = trained
    old = os.umask(0o022)
    try:
        path = save_adapter(lm, tmp_path / "shared")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755  # as `mkdir` and `open` give under umask 0o022
    assert [os.stat(os.path.join(path, f)).st_mode & 0o777 for f in (CONFIG, WEIGHTS)] == [0o644, 0o644]


def test_non_finite_weights_are_never_saved(trained, tmp_path):
    lm, _ = trained
    variable = lm.trainable_weights[1]
    kept = keras.ops.convert_to_numpy(variable)
    variable.assign(np.full(variable.shape, np.nan, "float32"))
    try:
        with pytest.raises(ValueError, match=rf"weight '{variable.path}' holds NaN or inf values .*nothing was written"):
            save_adapter(lm, tmp_path / "diverged")
    finally:
        variable.assign(kept)
    assert os.listdir(tmp_path) == []  # no folder, no partial folder


def test_an_adapter_loads_into_a_model_whose_sublayers_kerashub_numbered_otherwise(tmp_path):
    """KerasHub names MoE blocks by a process-wide counter: the loading model's paths differ only in numbers."""
    from tests.rewrite.tiny_models import TINY

    spec = TINY["QwenMoe"]

    def build():
        keras.utils.set_random_seed(0)
        return getattr(keras_hub.models, spec.task)(backbone=getattr(keras_hub.models, spec.backbone)(**spec.kwargs), preprocessor=None)

    lm = inject(build(), targets="all-linear", rank=2)
    rng = np.random.default_rng(0)
    for w in lm.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    x = {"token_ids": rng.integers(1, 200, (2, 6)), "padding_mask": np.ones((2, 6), "int32")}
    c = np.array([[1.0], [-2.0]], "float32")
    save_adapter(lm, tmp_path / "moe")
    other = build()
    assert {w.path for w in other.weights} != {w.path.replace("_lora_bias", "") for w in lm.weights if "lora" not in w.path}
    loaded = load_adapter(other, tmp_path / "moe")
    assert np.array_equal(out(loaded, {**x, "control": c}), out(lm, {**x, "control": c}))
