"""Every covered KerasHub family (`TINY`): each preset exact at insertion and reaching each stack of blocks (the widest, every block);
trained with the base bit-identical; a `.keras` round trip; steered generation. The README's coverage
table is generated from these tests (`python -m tests.rewrite.coverage`) and checked here."""

import functools
import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import inject
from keras_biasinject.rewrite.config import PRESETS
from keras_biasinject.rewrite.kerashub import backbone_of
from tests.rewrite import coverage
from tests.rewrite.tiny_models import TINY, UNCOVERED, build_family, family_inputs, state_of, takes_per_token, widest

BATCH, SEQ, DIM = 2, 8, 2
GENERATED = SEQ // 2 + 1  # generate: a 4-token prompt and 1 new token
PAIRS = [(family, preset) for family in sorted(TINY) for preset in TINY[family].presets]
MISSING = [(family, preset) for family in sorted(TINY) for preset in PRESETS if preset not in TINY[family].presets]


def numpy(outputs):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, outputs)


def same(a, b):
    """Exact equality of two outputs (a tensor, or a dict of tensors for a bare backbone)."""
    a, b = keras.tree.flatten(a), keras.tree.flatten(b)
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@functools.lru_cache(maxsize=None)
def base_output(family):
    """The base model's output on `family_inputs(family)`: one build per family, shared by its tests."""
    return numpy(build_family(family)(family_inputs(family)))


def stacks_of(backbone):
    """The stacks of transformer blocks (one, or encoder and decoder), read here independently of `inject`."""
    owners = [backbone, getattr(backbone, "language_model", None)]
    names = ["transformer_layers", "encoder_transformer_layers", "decoder_transformer_layers", "encoder_layers", "decoder_layers"]
    stacks = [getattr(owner, name, None) for owner in owners if owner is not None for name in names]
    return [keras.tree.flatten(stack) for stack in stacks if stack]  # ALBERT holds a list of groups of blocks


def controls(seed=1, scale=1.0):
    """A per-example `[B, DIM]` and a per-token `[B, T, DIM]` control, neither neutral (0)."""
    rng = np.random.default_rng(seed)
    return [scale * rng.normal(size=(BATCH, DIM)).astype("float32"), scale * rng.normal(size=(BATCH, SEQ, DIM)).astype("float32")]


def perturb_adapters(model, seed=2):
    """Every adapter weight set to nonzero values, so that any non-neutral control changes the output."""
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))


def check_exact_at_insertion(family, model, every_block):
    """Adapters in every stack (encoder and decoder), in every block if `every_block`; per-example and per-token
    controls (encoder-decoders refuse these) change nothing."""
    expected, x = base_output(family), family_inputs(family)
    paths = model.injection.paths
    for stack in stacks_of(backbone_of(model)):
        reached = [any(path.startswith(block.path + "/") for path in paths) for block in stack]
        assert all(reached) if every_block else any(reached), f"blocks {[b.path for b in stack]} reached: {reached}; {paths}"
    per_example, per_token = controls()
    assert same(numpy(model({**x, "control": per_example})), expected)
    if any(name.startswith("encoder_") for name in TINY[family].inputs):  # two sequences: one control per example
        with pytest.raises(ValueError, match=r"is an encoder-decoder: it takes one control per example"):
            model({**x, "control": per_token})
    elif takes_per_token(family):
        assert same(numpy(model({**x, "control": per_token})), expected)
    else:  # DeBERTa: exact where no adapted layer sees the position buckets, else a clear refusal
        try:
            assert same(numpy(model({**x, "control": per_token})), expected)
        except ValueError as error:
            buckets = 2 * TINY[family].kwargs["bucket_size"]  # DeBERTa's relative positions
            assert f"(per token), but this layer is called on {buckets} positions" in str(error), error


@pytest.mark.slow
@pytest.mark.parametrize("family,preset", [(f, p) for f, p in PAIRS if p != widest(f)])
def test_preset_is_exact_at_insertion_and_reaches_each_stack(family, preset):
    """The family's widest preset is checked in the family test below, in every block (hybrid models such as
    Qwen3.5 have blocks without query/value projections: here each stack needs one adapted block)."""
    check_exact_at_insertion(family, inject(build_family(family), targets=preset, rank=2, control_dim=DIM), every_block=False)


@pytest.mark.parametrize("family,preset", MISSING)
def test_preset_the_family_cannot_express_is_refused_and_the_model_left_unchanged(family, preset):
    model = build_family(family)
    before = state_of(model)
    with pytest.raises(ValueError, match=rf"inject: targets='{re.escape(preset)}'"):  # names the preset
        inject(model, targets=preset, rank=2, control_dim=DIM)
    after = state_of(model)
    assert after[0] is before[0] and after[2:] == before[2:]
    assert before[1].keys() == after[1].keys() and all(np.array_equal(before[1][k], after[1][k]) for k in before[1])


def labels_of(family, model, x):
    if isinstance(model, keras_hub.models.Seq2SeqLM):  # a CausalLM subclass: test it first
        return x["decoder_token_ids"]
    if isinstance(model, keras_hub.models.CausalLM):
        return x["token_ids"]
    if isinstance(model, keras_hub.models.Task):
        return np.array([0, 1])
    return keras.tree.map_structure(np.zeros_like, base_output(family))  # a bare backbone: regress its outputs to 0


def compile_eagerly(model, family):
    """Eager `fit` and `generate`: no tracing cost for a 2-step run."""
    if isinstance(model, keras_hub.models.Task):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = keras.tree.map_structure(lambda _: "mse", base_output(family))
    extra = {"sampler": "greedy"} if isinstance(model, (keras_hub.models.CausalLM, keras_hub.models.Seq2SeqLM)) else {}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=True, **extra)


def prompts(family):
    """Token dicts for `generate` (preprocessor None): the (decoder) prompt is the first half, the rest is padding."""
    x = family_inputs(family)
    first_half = np.arange(SEQ) < SEQ // 2
    for name in ("padding_mask", "decoder_padding_mask"):
        if name in x:
            x[name] = np.broadcast_to(first_half, (BATCH, SEQ)).astype("int32")
    if TINY[family].backbone == "Gemma3Backbone":  # KerasHub 0.32's Gemma3 generate returns `images`: None fails
        x["images"] = np.zeros((BATCH, 0, 16, 16, 3), "float32")
    if TINY[family].backbone == "RWKV7Backbone":  # RWKV7CausalLM.generate: the prompt but its last token is the state's
        prompt = x["token_ids"][:, : SEQ // 2]
        x = {"token_ids": prompt[:, :-1], "input_padding_mask": np.ones((BATCH, SEQ // 2 - 1), "int32"),
             "predict_token_ids": np.concatenate([prompt[:, -1:], np.zeros((BATCH, SEQ // 2), "int32")], axis=1)}
        x["padding_mask"] = (x["predict_token_ids"] != 0).astype("int32")
    return x


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY))
def test_family_trains_only_adapters_round_trips_and_generates(family, tmp_path):
    x, model = family_inputs(family), build_family(family)
    generative = isinstance(model, keras_hub.models.CausalLM)  # Seq2SeqLM included
    if generative:  # the base model's greedy tokens, before the splice
        compile_eagerly(model, family)
        p = prompts(family)
        expected_tokens = numpy(model.generate(p, max_length=GENERATED, stop_token_ids=None))
    model = inject(model, targets=widest(family), rank=2, control_dim=DIM)
    check_exact_at_insertion(family, model, every_block=True)
    before = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    adapters = {w.path for w in model.trainable_weights}

    compile_eagerly(model, family)
    model.fit({**x, "control": controls()[0]}, labels_of(family, model, x), epochs=2, batch_size=BATCH, verbose=0)
    after = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    for path, value in before.items():
        if path not in adapters:
            assert np.array_equal(after[path], value), f"base weight {path} changed in fit"
    assert any(not np.array_equal(after[p], before[p]) for p in adapters), "fit trained no adapter"
    # Trained adapters: the gate, not a zero B, keeps the neutral control exact.
    assert same(numpy(model({**x, "control": np.zeros((BATCH, DIM), "float32")})), base_output(family))

    control = controls(seed=3)[0]
    steered = numpy(model({**x, "control": control}))
    assert not same(steered, base_output(family))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded).__name__ == type(model).__name__
    assert same(numpy(loaded({**x, "control": control})), steered)

    if generative:
        neutral = model.generate(p, max_length=GENERATED, stop_token_ids=None, control=np.zeros((BATCH, DIM), "float32"))
        assert same(numpy(neutral), expected_tokens)
        perturb_adapters(model)  # an adapter strong enough to change a greedy token
        steered = model.generate(p, max_length=GENERATED, stop_token_ids=None, control=controls(seed=4, scale=3.0)[0])
        assert not same(numpy(steered), expected_tokens)


def test_a_model_built_through_keras_nlp_is_injected_the_same():
    import keras_nlp  # 0.32 re-exports keras_hub's classes

    spec = TINY["GPT2"]
    keras.utils.set_random_seed(0)
    lm = keras_nlp.models.GPT2CausalLM(backbone=keras_nlp.models.GPT2Backbone(**spec.kwargs), preprocessor=None)
    lm = inject(lm, targets="all-linear", rank=2, control_dim=DIM)
    reference = inject(build_family("GPT2"), targets="all-linear", rank=2, control_dim=DIM)
    assert isinstance(lm, keras_hub.models.GPT2CausalLM) and lm.injection.paths == reference.injection.paths
    x = family_inputs("GPT2")
    for control in controls():
        assert same(numpy(lm({**x, "control": control})), base_output("GPT2"))


def test_backbone_without_transformer_blocks_is_refused_with_what_is_supported():
    inputs = keras.Input((4,))
    backbone = keras_hub.models.Backbone(inputs=inputs, outputs=keras.layers.Dense(2, name="query")(inputs))
    with pytest.raises(ValueError, match=r"inject: Backbone has no `transformer_layers` \(nor encoder and decoder block lists: "
                                         r"encoder_transformer_layers \+ decoder_transformer_layers, .*\); inject supports KerasHub text backbones"):
        inject(backbone)


def test_every_kerashub_backbone_is_covered_or_has_a_reason():
    backbones = coverage.kerashub_backbones()
    covered = {spec.backbone for spec in TINY.values()}
    assert covered <= backbones, f"TINY names backbones keras_hub lacks: {sorted(covered - backbones)}"
    assert set(UNCOVERED) <= backbones, f"UNCOVERED names backbones keras_hub lacks: {sorted(set(UNCOVERED) - backbones)}"
    assert not covered & set(UNCOVERED), f"both covered and uncovered: {sorted(covered & set(UNCOVERED))}"
    missing = backbones - covered - set(UNCOVERED)
    assert not missing, f"add a tiny config to TINY or a reason to UNCOVERED for: {sorted(missing)}"


def test_readme_coverage_table_matches_the_families():
    """The README table is what `python -m tests.rewrite.coverage` writes when every test passes."""
    readme, expected = coverage.readme_table().splitlines(), coverage.table(coverage.all_passed()).splitlines()
    stale = sorted(set(readme) ^ set(expected))
    assert not stale, f"README coverage table disagrees with TINY/UNCOVERED or a family fails: {stale[:6]}"
