import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject, load_adapter, merge, remove, save_adapter
from keras_biasinject.rewrite.injected_model import InjectedModel
from tests.rewrite.tiny_models import BATCH, TINY, V, gpt2, out, snapshot, state_of, tokens, train


def trained_lm(**fields):
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    x = tokens()
    base_out = out(lm, x)
    base_state = state_of(lm)
    lm = inject(lm, **{"rank": 4, **fields})
    train(lm, {**x, "control": np.array([[2.0], [-1.0], [0.5]], "float32")}, steps=4)
    return lm, base_out, base_state


def test_merge_folds_one_control_into_a_plain_model(tmp_path):
    lm, base_out, _ = trained_lm()
    lm.add_control("positive", [2.0])
    x = tokens()
    before = snapshot(lm)
    steered = out(lm, {**x, "control": np.full((BATCH, 1), 2.0, "float32")})

    merged = merge(lm, "positive")
    assert type(merged) is keras_hub.models.GPT2CausalLM and not isinstance(merged, InjectedModel)
    assert len(merged.weights) == len(before) - 16  # no adapter weights
    # x(K + s A g B) + (b + c V) against xK + s (xA g) B + b + c V: same maths, other rounding order.
    np.testing.assert_allclose(out(merged, x), steered, rtol=1e-5, atol=1e-5 * np.abs(steered).max())
    assert not np.allclose(out(merged, x), base_out, atol=1e-4)
    after = snapshot(lm)  # the injected model is untouched
    assert after.keys() == before.keys() and all(np.array_equal(after[p], v) for p, v in before.items())

    # At the neutral control, gate "control": the merged model is the base model exactly.
    assert np.array_equal(out(merge(lm), x), base_out)

    # The merged model saves and loads with keras_hub alone.
    path = tmp_path / "merged.keras"
    merged.save(path)
    np.save(tmp_path / "x.npy", x["token_ids"])
    script = textwrap.dedent(f"""
        import sys
        import keras, keras_hub, numpy as np
        model = keras.models.load_model({str(path)!r})
        ids = np.load({str(tmp_path / 'x.npy')!r})
        y = model({{"token_ids": ids, "padding_mask": np.ones_like(ids)}})
        np.save({str(tmp_path / 'y.npy')!r}, keras.ops.convert_to_numpy(y))
        assert type(model).__name__ == "GPT2CausalLM"
        assert not any(m.startswith("keras_biasinject") for m in sys.modules), "keras_biasinject was imported"
    """)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), out(merged, x))


def test_merge_refuses_what_it_cannot_fold():
    lm, _, _ = trained_lm(control_dim=1)
    with pytest.raises(ValueError, match=r"one vector of 1 value\(s\) \(control_dim=1\).*Got shape \(3, 1\)"):
        merge(lm, np.ones((3, 1), "float32"))
    with pytest.raises(ValueError, match=r"Unknown named control\(s\) \['formal'\]"):
        merge(lm, "formal")
    with pytest.raises(ValueError, match="must be finite"):
        merge(lm, [float("inf")])
    with pytest.raises(ValueError, match="expected a model returned by `inject`; got a plain GPT2Backbone"):
        merge(gpt2())
    with pytest.raises(ValueError, match="backbone of an injected task; call `merge` on the task"):
        merge(lm.backbone)


def test_merge_needs_a_bias_for_the_control_term_when_the_base_has_none():
    spec = TINY["Llama"]
    cls, kwargs, task = spec.backbone, spec.kwargs, spec.task
    keras.utils.set_random_seed(0)
    lm = getattr(keras_hub.models, task)(backbone=getattr(keras_hub.models, cls)(**kwargs), preprocessor=None)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, V, (2, 6)), "padding_mask": np.ones((2, 6), "int32")}
    base_out = out(lm, x)
    lm = inject(lm, rank=2)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lm.fit({**x, "control": np.ones((2, 1), "float32")}, x["token_ids"], epochs=2, verbose=0)
    with pytest.raises(ValueError, match=r"layer 'transformer_layer_0/self_attention/(query|value)' has no bias over its outputs"):
        merge(lm, [1.0])
    assert np.array_equal(out(merge(lm, [0.0]), x), base_out)  # the term is zero at the neutral control


def test_remove_gives_the_base_model_back_exactly(tmp_path):
    lm, base_out, base_state = trained_lm()
    x = tokens()
    assert not np.array_equal(out(lm, {**x, "control": np.ones((BATCH, 1), "float32")}), base_out)
    returned = remove(lm)
    assert returned is lm and type(lm) is keras_hub.models.GPT2CausalLM and type(lm.backbone) is keras_hub.models.GPT2Backbone
    state = state_of(lm)
    assert [w for w in state[1]] == [w for w in base_state[1]]  # same variables, same order
    assert all(np.array_equal(state[1][p], v) for p, v in base_state[1].items())
    assert state[2] == base_state[2] and state[3] == base_state[3]  # trainable flags, layer tree
    assert np.array_equal(out(lm, x), base_out)
    assert not hasattr(lm, "injection") and not hasattr(lm.backbone, "injection")
    lm.save(tmp_path / "base.keras")  # a plain model again: saves, loads and can be injected anew
    assert np.array_equal(out(keras.models.load_model(tmp_path / "base.keras"), x), base_out)
    assert np.array_equal(out(inject(lm, rank=2), {**x, "control": np.ones((BATCH, 1), "float32")}), base_out)


def test_int8_base_works_unmerged_and_merge_says_why_not():
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    head = lm.backbone.token_embedding  # the tied output head: its int8 reverse projection has no usable gradient
    lm.quantize("int8", filters=lambda layer: layer is not head)
    x = tokens()
    base_out = out(lm, x)
    quantized = {p: v for p, v in snapshot(lm).items() if v.dtype == np.int8}
    assert len(quantized) >= 8  # the attention and MLP kernels are int8 now
    lm = inject(lm, rank=4)
    c = np.ones((BATCH, 1), "float32")
    assert np.array_equal(out(lm, {**x, "control": c}), base_out)  # exact at insertion, quantized base
    train(lm, {**x, "control": c}, steps=3)
    after = snapshot(lm)
    assert all(np.array_equal(after[p], v) for p, v in quantized.items())  # still the same int8 weights
    assert all(after[p].dtype == np.float32 for p in after if "_lora_bias/" in p)
    assert not np.array_equal(out(lm, {**x, "control": c}), base_out)
    assert np.array_equal(out(lm, {**x, "control": np.zeros_like(c)}), base_out)
    with pytest.raises(ValueError, match=r"merge: the base of 'transformer_layer_0/self_attention/(query|value)' \(and 3 more\) is quantized"):
        merge(lm, [1.0])
    assert all(np.array_equal(snapshot(lm)[p], v) for p, v in after.items())


def test_tied_llama_round_trips_and_merges(tmp_path):
    # KerasHub 0.32 drops `tie_word_embeddings` from Llama's get_config (SmolLM2 is tied).
    spec = TINY["Llama3"]
    cls, kwargs, task = spec.backbone, spec.kwargs, spec.task
    keras.utils.set_random_seed(0)
    lm = getattr(keras_hub.models, task)(backbone=getattr(keras_hub.models, cls)(**kwargs, tie_word_embeddings=True), preprocessor=None)
    x = {"token_ids": np.random.default_rng(0).integers(1, V, (2, 6)), "padding_mask": np.ones((2, 6), "int32")}
    base_out = out(lm, x)
    lm = inject(lm, rank=2)
    assert len(merge(lm).weights) == len(lm.weights) - 16 and np.array_equal(out(merge(lm), x), base_out)
    lm.save(tmp_path / "tied.keras")
    loaded = keras.models.load_model(tmp_path / "tied.keras")
    assert loaded.backbone.tie_word_embeddings and np.array_equal(out(loaded, x), base_out)
    # An adapter saved from it loads into a freshly built tied base (whose get_config lacks the flag).
    for w in lm.trainable_weights:
        w.assign(np.full(w.shape, 0.01, "float32"))
    save_adapter(lm, tmp_path / "adapter")
    keras.utils.set_random_seed(0)
    fresh = getattr(keras_hub.models, task)(backbone=getattr(keras_hub.models, cls)(**kwargs, tie_word_embeddings=True), preprocessor=None)
    c = {"control": np.ones((2, 1), "float32")}
    assert np.array_equal(out(load_adapter(fresh, tmp_path / "adapter"), {**x, **c}), out(lm, {**x, **c}))


def test_merge_of_a_bias_injection_folds_the_control_into_the_biases():
    lm, base_out, _ = trained_lm(kind="bias", targets="attention")
    x = tokens()
    before = snapshot(lm)
    steered = out(lm, {**x, "control": np.full((BATCH, 1), 2.0, "float32")})

    merged = merge(lm, [2.0])
    assert type(merged) is keras_hub.models.GPT2CausalLM
    assert len(merged.weights) == len(before) - 8  # one V per attention projection, 4 x 2 blocks
    changed = sorted(p for p, v in snapshot(merged).items() if not np.array_equal(v, before[p]))
    assert len(changed) == 8 and all(p.endswith("/bias") for p in changed)  # kernels untouched
    # x K + (b + c V) against (x K + b) + c V: same maths, other rounding order.
    np.testing.assert_allclose(out(merged, x), steered, rtol=1e-5, atol=1e-5 * np.abs(steered).max())
    assert not np.allclose(out(merged, x), base_out, atol=1e-4)
    assert all(np.array_equal(snapshot(lm)[p], v) for p, v in before.items())  # the injected model is untouched
    assert np.array_equal(out(merge(lm), x), base_out)  # the neutral control: the base exactly


def test_training_through_an_int8_lm_head_is_refused_before_anything_changes():
    """Keras' int8 ReversibleEmbedding, in reverse (the LM head), gives its input a wrong gradient: fit and
    train_on_batch refuse to train below it, say how to quantize around it, and change nothing."""
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    lm.quantize("int8")
    lm = inject(lm, rank=2)
    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = {**tokens(), "control": np.ones((BATCH, 1), "float32")}
    before = snapshot(lm)
    message = (r"layer 'token_embedding' is a ReversibleEmbedding quantized to int8, this causal LM's output head\. .* wrong gradient .*"
               r"filters=lambda layer: not isinstance\(layer, keras\.layers\.ReversibleEmbedding\)")
    with pytest.raises(ValueError, match="fit: " + message):
        lm.fit(x, x["token_ids"], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="train_on_batch: " + message):
        lm.train_on_batch(x, x["token_ids"])
    assert not lm.optimizer.built
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(lm).items())
