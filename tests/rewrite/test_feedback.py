"""The extended output layer on tiny KerasHub models: outputs untouched (==), training, generation
readings equal to a forward pass, save/load, and the bad inputs."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import (
    DecayFeedback, FeedbackHead, FeedbackLoop, add_feedback_head, inject, load_adapter, remove, remove_feedback_head,
    save_adapter,
)
from tests.rewrite.tiny_models import gpt2, snapshot

VOCAB, SEQ = 64, 8


def llama_lm():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCAB, num_layers=2, hidden_dim=16, intermediate_dim=32,
                                              num_query_heads=4, num_key_value_heads=2)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((4, SEQ), "int32")
    mask[0, 5:] = 0
    mask[1, 3:] = 0
    return {"token_ids": rng.integers(1, VOCAB, (4, SEQ)) * mask, "padding_mask": mask}


def prompts():
    """Two prompts of different lengths, room for 9 and 8 new tokens (right padding, as KerasHub pads)."""
    ids = np.zeros((2, 12), "int32")
    mask = np.zeros((2, 12), bool)
    ids[0, :3], mask[0, :3] = [5, 6, 7], True
    ids[1, :4], mask[1, :4] = [8, 9, 10, 11], True
    return {"token_ids": ids, "padding_mask": mask}


def labels_per_token(x, values):
    return np.broadcast_to(np.asarray(values, "float32")[:, None, None], x["token_ids"].shape + (1,)).copy()


def np_out(value):
    return keras.ops.convert_to_numpy(value)


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama LM: injected, a sigmoid head trained (with the adapters) to read a made-up label."""
    lm = llama_lm()
    x = batch()
    base_logits = np_out(lm(x))
    lm.compile(sampler="greedy")
    base_tokens = lm.generate(prompts(), stop_token_ids=None)["token_ids"]
    inject(lm, targets="all-linear", rank=2)
    add_feedback_head(lm, FeedbackHead(1))
    control = np.array([[1.0], [-1.0], [1.0], [-1.0]], "float32")
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy",
               loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "feedback": "binary_crossentropy"},
               loss_weights={"logits": 1.0, "feedback": 2.0}, weighted_metrics=None)
    before = snapshot(lm)
    y = {"logits": x["token_ids"], "feedback": labels_per_token(x, [1, 0, 1, 0])}
    lm.fit({**x, "control": control}, y, sample_weight={"logits": x["padding_mask"], "feedback": x["padding_mask"]},
           epochs=4, batch_size=4, verbose=0)
    return lm, x, base_logits, base_tokens, before


def test_the_head_changes_no_output_and_trains_with_fit(trained):
    lm, x, base_logits, _, before = trained
    out = lm({**x, "control": np.zeros((4, 1), "float32")})
    assert set(out) == {"logits", "feedback"}
    assert np.array_equal(np_out(out["logits"]), base_logits)  # trained head and adapters, neutral control: the base
    assert np_out(out["feedback"]).shape == (4, SEQ, 1)  # a causal LM reads every prefix
    after = snapshot(lm)
    moved = [p for p in after if p in before and not np.array_equal(after[p], before[p])]
    assert any(p.startswith("feedback_head/") for p in moved) and any("lora" in p for p in moved)
    assert all(p.startswith("feedback_head/") or "lora" in p or "control" in p for p in moved), moved


def test_head_alone_trains_with_everything_else_frozen():
    lm = inject(llama_lm(), rank=2)
    add_feedback_head(lm, FeedbackHead(1, pooling="mean"))
    for variable in lm.trainable_weights:
        if not variable.path.startswith("feedback_head/"):
            variable.trainable = False
    before = snapshot(lm)
    x = batch(1)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"feedback": "binary_crossentropy"}, weighted_metrics=None)
    history = lm.fit(x, {"feedback": labels_per_token(x, [1, 0, 0, 1])}, sample_weight={"feedback": x["padding_mask"]},
                     epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    after = snapshot(lm)
    assert sorted(p for p in after if not np.array_equal(after[p], before[p])) == ["feedback_head/bias", "feedback_head/kernel"]


def test_generation_reading_equals_a_forward_pass_and_tokens_are_unchanged(trained):
    lm, _, _, base_tokens, _ = trained
    for control in ([0.0], [1.0]):
        out, reading = lm.generate(prompts(), stop_token_ids=None, control=control, return_feedback=True)
        forward = lm.read_feedback({"token_ids": out["token_ids"], "padding_mask": out["padding_mask"]}, control=control)
        assert reading.shape == (2, 1)
        np.testing.assert_allclose(reading, forward, atol=1e-5, rtol=0)
        without = lm.generate(prompts(), stop_token_ids=None, control=control)  # the head changes no token
        assert np.array_equal(without["token_ids"], out["token_ids"])
    assert np.array_equal(lm.generate(prompts(), stop_token_ids=None, control=[0.0])["token_ids"], base_tokens)


def test_generation_reading_with_stop_tokens_reads_up_to_the_end_token(trained):
    lm, _, _, _, _ = trained
    out, _ = lm.generate(prompts(), stop_token_ids=None, control=[1.0], return_feedback=True)
    stop = int(out["token_ids"][0, 4])  # a token the first row generates: it stops there
    stopped, reading = lm.generate(prompts(), stop_token_ids=[stop], control=[1.0], return_feedback=True)
    forward = lm.read_feedback({"token_ids": stopped["token_ids"], "padding_mask": stopped["padding_mask"]}, control=[1.0])
    np.testing.assert_allclose(reading, forward, atol=1e-5, rtol=0)
    assert not np.all(stopped["padding_mask"][0])  # the first row did stop early


def test_keras_file_and_adapter_folder_keep_the_head(trained, tmp_path):
    lm, x, _, _, _ = trained
    inputs = {**x, "control": np.full((4, 1), 0.5, "float32")}
    expected = {k: np_out(v) for k, v in lm(inputs).items()}
    lm.save(tmp_path / "lm.keras")
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    got = {k: np_out(v) for k, v in loaded(inputs).items()}
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    save_adapter(lm, tmp_path / "adapter")
    again = load_adapter(llama_lm(), tmp_path / "adapter")
    got = {k: np_out(v) for k, v in again(inputs).items()}
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert again.feedback_head.get_config() == lm.feedback_head.get_config()


def test_remove_gives_the_base_back_without_the_head():
    lm = llama_lm()
    x = batch()
    expected, weights = np_out(lm(x)), [w.path for w in lm.weights]
    inject(lm, rank=2)
    add_feedback_head(lm, FeedbackHead(2, activation="tanh"))
    remove(lm)
    assert type(lm) is keras_hub.models.LlamaCausalLM and [w.path for w in lm.weights] == weights
    assert np.array_equal(np_out(lm(x)), expected) and "feedback_head" not in lm.__dict__


def test_backbone_and_classifier_heads_are_pooled():
    backbone = inject(gpt2(), rank=2)
    x = {"token_ids": batch()["token_ids"], "padding_mask": batch()["padding_mask"]}
    plain = np_out(backbone(x)["sequence_output"] if isinstance(backbone(x), dict) else backbone(x))
    add_feedback_head(backbone, FeedbackHead(3, pooling="last", activation="linear"))
    out = backbone(x)
    assert np.array_equal(np_out(out["sequence_output"]), plain)
    head = backbone.feedback_head
    last = x["padding_mask"].sum(1) - 1
    by_hand = plain[np.arange(4), last] @ np_out(head.kernel) + np_out(head.bias)
    np.testing.assert_allclose(np_out(out["feedback"]), by_hand, atol=1e-6)
    np.testing.assert_allclose(backbone.read_feedback(x), by_hand, atol=1e-6)


def test_bad_inputs_name_the_argument_and_leave_the_model_unchanged():
    lm = llama_lm()
    with pytest.raises(ValueError, match="not injected.*inject"):
        add_feedback_head(lm, FeedbackHead(1))
    assert lm.__dict__.get("feedback_head") is None
    with pytest.raises(ValueError, match="feedback_dim"):
        FeedbackHead(0)
    with pytest.raises(ValueError, match="pooling"):
        FeedbackHead(1, pooling="max")
    inject(lm, rank=2)
    with pytest.raises(ValueError, match="no feedback head"):
        lm.generate(prompts(), stop_token_ids=None, return_feedback=True)
    with pytest.raises(ValueError, match="no feedback head"):
        lm.read_feedback(batch())
    add_feedback_head(lm, FeedbackHead(1))
    with pytest.raises(ValueError, match="has a feedback head already"):
        add_feedback_head(lm, FeedbackHead(1))
    lm.compile(sampler="beam")
    with pytest.raises(ValueError, match="BeamSampler.*greedy"):
        lm.generate(prompts(), stop_token_ids=None, return_feedback=True)
    built = FeedbackHead(1)
    built.build((None, None, 7))
    remove_feedback_head(lm)
    with pytest.raises(ValueError, match="hidden_dim 7.*16"):
        add_feedback_head(lm, built)
    assert lm.feedback_head is None


# The loop in the library.

def loop_model():
    lm = inject(llama_lm(), rank=2)
    add_feedback_head(lm, FeedbackHead(1))
    lm.compile(sampler="greedy")
    return lm


def test_loop_steps_the_decaying_state_by_the_error_it_reads():
    lm = loop_model()
    decay = DecayFeedback(1, half_life=2.0, max_norm=0.5)
    loop = FeedbackLoop(lm, decay, mode="self", target=0.9)
    loop.generate(prompts(), at=0.0, stop_token_ids=None)
    first = loop.history[-1]
    assert first.control == [0.0]  # a new session starts neutral
    _, reading = lm.generate(prompts(), stop_token_ids=None, control=[0.0], return_feedback=True)
    np.testing.assert_allclose(first.reading, reading.mean(0), atol=1e-6)
    np.testing.assert_allclose(loop.state, 0.9 - reading.mean(0), atol=1e-6)
    loop.generate(prompts(), at=2.0, stop_token_ids=None)  # one half-life later
    second = loop.history[-1]
    expected = np.clip(0.5 * (0.9 - reading.mean(0)), -0.5, 0.5)
    np.testing.assert_allclose(second.control, expected, atol=1e-6)
    np.testing.assert_allclose(loop.control(2.0 + 2 * 1e9), [0.0], atol=1e-6)  # with no feedback it fades to neutral


def test_loop_modes_and_ratings():
    lm = loop_model()
    external = FeedbackLoop(lm, DecayFeedback(1, half_life=1.0), mode="external")
    external.generate(prompts(), at=0.0, stop_token_ids=None)
    assert external.state.tolist() == [0.0] and external.history[-1].reading is not None
    assert external.rate([1.0], at=1.0).tolist() == [1.0]
    both = FeedbackLoop(lm, DecayFeedback(1, half_life=1.0), mode="both")
    both.rate([0.25], at=0.0)
    both.generate(prompts(), at=0.0, stop_token_ids=None)
    np.testing.assert_allclose(both.state, 0.25 + np.asarray(both.history[-1].reading), atol=1e-6)
    with pytest.raises(ValueError, match="mode is 'self'"):
        FeedbackLoop(lm, DecayFeedback(1, half_life=1.0)).rate([1.0], at=0.0)


def test_loop_bad_inputs_leave_the_session_unchanged():
    lm = loop_model()
    decay = DecayFeedback(1, half_life=1.0)
    with pytest.raises(ValueError, match=r"target.*\(0.0, 1.0\).*sigmoid"):
        FeedbackLoop(lm, decay, target=1.5)
    with pytest.raises(ValueError, match="mode"):
        FeedbackLoop(lm, decay, mode="auto")
    with pytest.raises(ValueError, match="feedback_dim=1"):
        FeedbackLoop(lm, DecayFeedback(1, half_life=1.0, feedback_dim=2))
    plain = inject(llama_lm(), rank=2)
    with pytest.raises(ValueError, match="has none.*mode='external'"):
        FeedbackLoop(plain, decay, mode="self")
    loop = FeedbackLoop(lm, decay, mode="both", target=0.5)
    loop.rate([1.0], at=5.0)
    state, history = loop.state.copy(), list(loop.history)
    for bad in ([float("nan")], [float("inf")], [1.0, 2.0]):
        with pytest.raises(ValueError, match="rating"):
            loop.rate(bad, at=6.0)
    with pytest.raises(ValueError, match="before the session's last update"):
        loop.generate(prompts(), at=4.0, stop_token_ids=None)
    with pytest.raises(ValueError, match="finite number"):
        loop.generate(prompts(), at=float("nan"), stop_token_ids=None)
    assert np.array_equal(loop.state, state) and loop.history == history


def test_merge_and_guarded_adapt_work_on_a_model_with_a_head(trained):
    from keras_biasinject import merge
    from keras_biasinject.serving.adapt import guarded_adapt

    lm, x, base_logits, _, _ = trained
    plain = merge(lm)  # the neutral control, folded: the base model, without the head
    assert type(plain) is keras_hub.models.LlamaCausalLM and np.array_equal(np_out(plain(x)), base_logits)
    head_before = snapshot(lm)
    examples = {**{k: v[:2] for k, v in x.items()}, "control": np.ones((2, 1), "float32"), "labels": x["token_ids"][:2]}
    heldout = {**{k: v[2:] for k, v in x.items()}, "control": np.ones((2, 1), "float32"), "labels": x["token_ids"][2:]}
    result = guarded_adapt(lm, examples, heldout, steps=2, learning_rate=1e-3, max_loss_increase=10.0)
    assert result.accepted and np.isfinite(result.loss_after)
    after = snapshot(lm)
    assert all(np.array_equal(after[p], head_before[p]) for p in after if p.startswith("feedback_head/"))  # logits' loss only
    assert np.array_equal(np_out(lm({**x, "control": np.zeros((4, 1), "float32")})["logits"]), base_logits)
