"""Several adapters in one model: one combined control, rows that use different adapters, a mix or none."""

import json
import shutil
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject import inject, load_adapter, merge, remove, save_adapter
from keras_biasinject.cli.main import main as kbi
from keras_biasinject.export import export_saved_model
from tests.rewrite.tiny_models import gpt2, out, snapshot, state_of, tokens

A = dict(targets="attention", rank=2, gate="control")  # control_dim 1, neutral 0
B = dict(targets=["query", "feedforward_output_dense"], rank=3, control_dim=2, neutral=[0.0, 1.0], gate="control")
ROWS = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": 0.5}, {}]  # a, b, a 0.5/0.5 mix, none


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A GPT-2 backbone with adapters a (attention, rank 2, one control value) and b (query, which a adapts
    too, and the feed-forward output; rank 3, two values), hand-set non-zero weights, saved by name."""
    base = gpt2()
    x = tokens(batch=4)
    y_base = out(base, x)
    base_weights = snapshot(base)
    model = inject(base, name="a", **A)
    inject(model, name="b", **B)
    rng = np.random.default_rng(0)
    for w in model.trainable_weights:
        w.assign((0.3 * rng.normal(size=w.shape)).astype("float32"))
    model.add_control("a/on", model.control_for({"a": [1.0]}))
    model.add_control("b/up", model.control_for({"b": [1.0, 2.0]}))
    folder = tmp_path_factory.mktemp("adapters")
    save_adapter(model, folder / "a", name="a")
    save_adapter(model, folder / "b", name="b")
    return types.SimpleNamespace(model=model, x=x, y_base=y_base, base_weights=base_weights, folder=folder)


def both_loaded(two):
    """A fresh base with a and b loaded from their folders, by name."""
    return load_adapter(load_adapter(gpt2(), two.folder / "a", name="a"), two.folder / "b", name="b")


def test_the_control_is_the_adapters_controls_side_by_side(two):
    m = two.model
    assert list(m.adapters) == ["a", "b"] and m.control_layout == {"a": (0, 1), "b": (1, 3)}
    assert m.injection.config.control_dim == 3 and m.injection.config.neutral == [0.0, 0.0, 1.0]
    assert tuple(m.control_input.shape) == (None, 3)
    np.testing.assert_array_equal(m.mix(ROWS), [[1, 0, 1], [0, 1, 2], [0.5, 0.5, 1.5], [0, 0, 1]])
    np.testing.assert_array_equal(m.control_for({"b": [[3.0, 4.0], [5.0, 6.0]]}), [[0, 3, 4], [0, 5, 6]])
    query = m.transformer_layers[0]._self_attention_layer._query_dense  # b's adapter adds to a's
    assert (query.name, query.inner.name) == ("query_b_lora_bias", "query_lora_bias")
    assert query.inner.base_layer is query.base_layer


def test_rows_using_different_adapters_equal_separate_calls_and_none_is_the_base(two):
    m, x = two.model, two.x
    c = m.mix(ROWS)
    got = out(m, {**x, "control": c})
    only_a, only_b = load_adapter(gpt2(), two.folder / "a"), load_adapter(gpt2(), two.folder / "b")
    # 1e-5: a batch of four against a call of one row (another summation order in the kernels).
    np.testing.assert_allclose(got[:1], out(only_a, {**x, "control": [[1.0]] * 4})[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1:2], out(only_b, {**x, "control": [[1.0, 2.0]] * 4})[1:2], rtol=1e-5, atol=1e-5)
    one_row = {k: v[2:3] for k, v in x.items()}
    np.testing.assert_allclose(got[2:3], out(m, {**one_row, "control": c[2:3]}), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[3], two.y_base[3])  # none: exactly the base
    for row in range(3):  # each adapter does change its rows
        assert np.abs(got[row] - two.y_base[row]).max() > 1e-2
    assert np.abs(got[2] - got[0]).max() > 1e-3 and np.abs(got[2] - got[1]).max() > 1e-3


def test_all_neutral_is_the_base_exactly(two):
    m, x = two.model, two.x
    np.testing.assert_array_equal(out(m, x), two.y_base)
    np.testing.assert_array_equal(out(m, {**x, "control": m.mix({})}), two.y_base)
    per_token = np.broadcast_to(m.injection.config.neutral, (4, x["token_ids"].shape[1], 3)).astype("float32")
    np.testing.assert_array_equal(out(m, {**x, "control": per_token}), two.y_base)


def test_keras_file_round_trip_and_each_adapter_saved_and_loaded_by_name(two, tmp_path):
    m, x = two.model, two.x
    c = m.mix(ROWS)
    expected = out(m, {**x, "control": c})
    m.save(tmp_path / "two.keras")
    loaded = keras.models.load_model(tmp_path / "two.keras")
    assert list(loaded.adapters) == ["a", "b"] and loaded.named_controls == m.named_controls
    np.testing.assert_array_equal(out(loaded, {**x, "control": c}), expected)

    again = both_loaded(two)
    assert again.named_controls == m.named_controls  # "on" from a's folder, "up" from b's, the other adapter neutral
    np.testing.assert_array_equal(out(again, {**x, "control": c}), expected)
    assert json.loads((two.folder / "b" / "adapter_config.json").read_text())["named_controls"] == {"up": [1.0, 2.0]}


def test_merge_at_a_mix_and_remove_back_to_the_base(two):
    model, x = both_loaded(two), two.x
    c = model.mix({"a": 0.7, "b": 0.3})
    merged = merge(model, c)
    assert type(merged).__name__ == "GPT2Backbone"
    # 1e-5: the merged kernels hold both updates, rounded once more than the unmerged sum.
    np.testing.assert_allclose(out(merged, x), out(model, {**x, "control": np.tile(c, (4, 1))}), rtol=1e-5, atol=1e-5)
    remove(model)
    assert type(model).__name__ == "GPT2Backbone" and snapshot(model).keys() == two.base_weights.keys()
    assert all(np.array_equal(v, two.base_weights[p]) for p, v in snapshot(model).items())
    np.testing.assert_array_equal(out(model, x), two.y_base)


def test_bad_input_names_the_argument_and_leaves_the_model_as_it_was(two, tmp_path):
    m, x = two.model, two.x
    before, expected = state_of(m), out(m, {**x, "control": m.mix(ROWS)})
    with pytest.raises(ValueError, match=r"already injected, with an adapter named 'a' .*pass a new `name`"):
        inject(m, name="a", **B)
    with pytest.raises(ValueError, match=r"already has an adapter named 'b' \(its adapters: \['a', 'b'\]\).*name='b_2'"):
        load_adapter(m, two.folder / "b", name="b")
    with pytest.raises(ValueError, match=r"mix: unknown adapter\(s\) \['c'\]. This model's adapters are \['a', 'b'\]"):
        m.mix({"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match=r"control_for: adapter 'b' reads 2 value\(s\) \(control\[..., 1:3\]\)"):
        m.control_for({"b": [1.0]})
    with pytest.raises(ValueError, match=r"has shape \(4, 2\).*3 values.*'a' -> control\[..., 0:1\], 'b' -> control\[..., 1:3\]"):
        m({**x, "control": np.zeros((4, 2), "float32")})
    with pytest.raises(ValueError, match=r"save_adapter: this model has 2 adapters \['a', 'b'\]; pass `name=`"):
        save_adapter(m, tmp_path / "all")
    tampered = tmp_path / "b_query_only"  # its injection no longer names the weights it holds
    shutil.copytree(two.folder / "b", tampered)
    config = json.loads((tampered / "adapter_config.json").read_text())
    config["injection"]["targets"] = ["query"]
    (tampered / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit this model"):
        load_adapter(m, tampered, name="c")  # injected, then undone
    after = state_of(m)
    assert after[0] is before[0] and after[2] == before[2] and after[3] == before[3]
    assert after[1].keys() == before[1].keys() and all(np.array_equal(after[1][p], v) for p, v in before[1].items())
    assert list(m.adapters) == ["a", "b"] and m.injection.config.control_dim == 3
    np.testing.assert_array_equal(out(m, {**x, "control": m.mix(ROWS)}), expected)
    assert not (tmp_path / "all").exists()


def test_export_and_serve_with_two_adapters(two, tmp_path):
    """`kbi export` of a two-adapter model and `kbi serve`'s predict on it (in process): a request's control is
    the combined vector, or a stored name through `serve_named`."""
    from keras_biasinject.serving.app import create_app

    m, x = two.model, two.x
    export_saved_model(m, tmp_path / "serving", "lm")
    server = create_app(tmp_path / "serving" / "lm", tmp_path / "sessions.sqlite").routes[0].endpoint.__self__
    c = m.mix(ROWS)
    rows = [{"token_ids": x["token_ids"][i].tolist(), "padding_mask": x["padding_mask"][i].tolist(), "control": c[i].tolist()}
            for i in range(4)]
    got = np.asarray(server.predict("lm", {"instances": rows})["predictions"])
    # 1e-5: the SavedModel's graph sums in another order than the eager model.
    np.testing.assert_allclose(got, out(m, {**x, "control": c}), rtol=1e-5, atol=1e-5)
    names = ["a/on", "b/up", "b/up", "a/on"]
    named_rows = [{**{k: v for k, v in row.items() if k != "control"}, "control_name": name} for row, name in zip(rows, names)]
    got = np.asarray(server.predict("lm", {"signature_name": "serve_named", "instances": named_rows})["predictions"])
    np.testing.assert_allclose(got, out(m, {**x, "control": names}), rtol=1e-5, atol=1e-5)

    m.save(tmp_path / "two.keras")  # `kbi export --control a=0.5,b=0.5`: the mix merged into the weights
    assert kbi(["export", str(tmp_path / "two.keras"), "--out", str(tmp_path / "merged"), "--name", "mix",
                "--control", "a=0.5,b=0.5"]) == 0
    serve = tf.saved_model.load(str(tmp_path / "merged" / "mix" / "1")).signatures["serve"]
    assert "control" not in serve.structured_input_signature[1]
    got = serve(**{k: tf.constant(v, "int32") for k, v in x.items()})["outputs"].numpy()
    expected = out(m, {**x, "control": np.tile(m.mix({"a": 0.5, "b": 0.5}), (4, 1))})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # 1e-5: merged kernels, and the graph's order


def test_a_steering_vector_from_examples_goes_to_the_named_adapter_only():
    from keras_biasinject import control_from_examples

    model = inject(inject(gpt2(), name="a", **A), name="b", **B)
    pos, neg = tokens(seed=1, batch=2), tokens(seed=2, batch=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"several adapters \['a', 'b'\].*name="):
        control_from_examples(model, pos, neg)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        control_from_examples(model, pos, neg, name="c")
    with pytest.raises(ValueError, match=r"dimension.*from 0 to 1"):  # b's own part has two values
        control_from_examples(model, pos, neg, name="b", dimension=2)
    assert all(np.array_equal(v, before[k]) for k, v in snapshot(model).items())
    control_from_examples(model, pos, neg, name="b", dimension=1)
    changed = {k for k, v in snapshot(model).items() if not np.array_equal(v, before[k])}
    assert changed and all("_b_lora_bias/control_kernel" in k or "feedforward_output_dense_lora_bias" in k for k in changed), changed
    for k in changed:  # row 1 of b's V only
        np.testing.assert_array_equal(snapshot(model)[k][0], before[k][0])
