"""`generate` computes each adapter's control-only terms once, before the decoding loop (hoisted):
the same values, bit for bit, as computing them at every step."""

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_biasinject import inject
from keras_biasinject.layers.control import control_scope
from keras_biasinject.rewrite.injected_model import InjectedCausalLM
from tests.rewrite.tiny_models import BATCH, SEQ, gpt2, tokens, train


def steered_lm(targets="all-linear"):
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    lm.compile(sampler="greedy")
    lm = inject(lm, targets=targets, rank=4, gate="control")
    train(lm, {**tokens(), "control": np.full((BATCH, 1), 3.0, "float32")}, steps=10)
    return lm


def test_a_hoisted_adapter_computes_exactly_what_the_plain_one_does_and_uses_the_terms():
    lm = steered_lm()
    control = tf.constant([[2.0], [-1.0], [0.5]])
    hoisted = lm._hoisted(control)
    adapters = [a for _, a in lm._kbi_undo.splices]
    assert len(hoisted) == len(adapters) == 12  # every LoRA-bias adapter hoists
    x = tf.random.stateless_normal((BATCH, SEQ, 16), seed=(1, 2))
    query = next(a for a in adapters if a.path.endswith("query_lora_bias"))
    with control_scope(control):
        plain = np.asarray(query(x))
    with control_scope(control, hoisted):
        np.testing.assert_array_equal(np.asarray(query(x)), plain)
    strength, bias = hoisted[id(query)]
    with control_scope(control, {id(query): (strength * 2.0, bias)}):  # the terms are what the layer reads
        assert not np.array_equal(np.asarray(query(x)), plain)
    with control_scope(control, {id(query): (strength * 2.0, bias)}):  # but not for another control passed by hand
        np.testing.assert_array_equal(np.asarray(query(x, control=tf.identity(control))), plain)


def test_generate_with_hoisted_terms_equals_generate_without(monkeypatch):
    lm = steered_lm()
    prompt = tokens(batch=3)
    prompt["padding_mask"][:, 3:] = 0  # 3-token prompts, 5 tokens to generate
    mixed = np.array([[3.0], [0.0], [-2.0]], "float32")  # one control per row
    hoisted = keras.ops.convert_to_numpy(lm.generate(dict(prompt), stop_token_ids=None, control=mixed)["token_ids"])
    monkeypatch.setattr(InjectedCausalLM, "_hoisted", lambda self, control: None)
    lm.generate_function = None  # traced again, without hoisting
    plain = keras.ops.convert_to_numpy(lm.generate(dict(prompt), stop_token_ids=None, control=mixed)["token_ids"])
    np.testing.assert_array_equal(hoisted, plain)
    neutral = keras.ops.convert_to_numpy(lm.generate(dict(prompt), stop_token_ids=None, control=np.zeros((3, 1), "float32"))["token_ids"])
    assert not np.array_equal(hoisted[0], neutral[0])  # row 0 is steered


def test_with_xla_the_neutral_control_generates_the_base_models_tokens():
    """`jit_compile = True` (XLA) on both: the injected model at the neutral control generates exactly
    the base's tokens, and a control still steers."""
    base = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    base.compile(sampler="greedy")
    base.jit_compile = True
    prompt = tokens(batch=3)
    prompt["padding_mask"][:, 3:] = 0
    expected = keras.ops.convert_to_numpy(base.generate(dict(prompt), stop_token_ids=None)["token_ids"])
    lm = steered_lm()
    lm.jit_compile = True
    lm.generate_function = None
    base_weights = {v.path: np.asarray(v) for v in base.weights}  # the same base (both from gpt2(): seed 0)
    shared = [v for v in lm.weights if v.path in base_weights]
    assert len(shared) == len(base_weights) and all(np.array_equal(np.asarray(v), base_weights[v.path]) for v in shared)
    neutral = lm.generate(dict(prompt), stop_token_ids=None, control=np.zeros((3, 1), "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(neutral["token_ids"]), expected)
    steered = lm.generate(dict(prompt), stop_token_ids=None, control=np.full((3, 1), 3.0, "float32"))
    assert not np.array_equal(keras.ops.convert_to_numpy(steered["token_ids"]), expected)
