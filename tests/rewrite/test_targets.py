"""The presets are read from each model's structure: exact matched paths on tiny KerasHub families, and the
errors for presets a family cannot express (raised before the model changes)."""

import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import InjectionConfig, inject
from keras_biasinject.rewrite.targets import blocks_of, find_layers, find_targets
from tests.rewrite.tiny_models import state_of

V = 64
DECODER = dict(vocabulary_size=V, num_layers=2, hidden_dim=16, intermediate_dim=32)
BUILD = {  # family -> (backbone class, tiny kwargs): hidden 16, 2 layers
    "GPT2": ("GPT2Backbone", dict(DECODER, num_heads=2, max_sequence_length=8)),
    "Llama": ("LlamaBackbone", dict(DECODER, num_query_heads=4, num_key_value_heads=2)),
    "BERT": ("BertBackbone", dict(DECODER, num_heads=2, max_sequence_length=8)),
    "GPTNeoX": ("GPTNeoXBackbone", dict(DECODER, num_heads=2, max_sequence_length=8)),  # fused query_key_value
    "Bart": ("BartBackbone", dict(DECODER, num_heads=2, max_sequence_length=8)),  # encoder-decoder
    "Mixtral": ("MixtralBackbone", dict(DECODER, num_query_heads=4, num_key_value_heads=2, num_experts=2)),  # MoE
    "FNet": ("FNetBackbone", dict(DECODER, max_sequence_length=8)),  # no attention
}


@pytest.fixture(scope="module")
def models():
    """Each tiny backbone built once, on first use."""
    built = {}

    def get(family):
        if family not in built:
            name, kwargs = BUILD[family]
            keras.utils.set_random_seed(0)
            built[family] = getattr(keras_hub.models, name)(**kwargs)
        return built[family]

    return get


def each(blocks, names):
    """Every `block/name` path, for hand-listed block prefixes and layer names."""
    return sorted(f"{block}/{name}" for block in blocks for name in names)


def found(backbone, **fields):
    """Matched paths, sorted; Mixtral's MoE block is auto-named (`_1`, `_2`, ... by process-wide count): unnumbered here."""
    paths = (t.path for t in find_targets(backbone, InjectionConfig(**fields)))
    return sorted(re.sub(r"/mixtral_sparse_moe_block(_\d+)?/", "/mixtral_sparse_moe_block/", p) for p in paths)


DEC = ["transformer_layer_0", "transformer_layer_1"]
ENC = ["transformer_encoder_layer_0", "transformer_encoder_layer_1"]
BART_DEC = ["transformer_decoder_layer_0", "transformer_decoder_layer_1"]
QKVO = ["query", "key", "value", "attention_output"]

EXPECTED = {
    "GPT2": {
        "query_value": each(DEC, ["self_attention/query", "self_attention/value"]),
        "attention": each(DEC, [f"self_attention/{n}" for n in QKVO]),
        "mlp": each(DEC, ["feedforward_intermediate_dense", "feedforward_output_dense"]),
        "all-linear": each(DEC, [f"self_attention/{n}" for n in QKVO] + ["feedforward_intermediate_dense", "feedforward_output_dense"]),
    },
    "Llama": {
        "query_value": each(DEC, ["self_attention/query", "self_attention/value"]),
        "attention": each(DEC, [f"self_attention/{n}" for n in QKVO]),
        "mlp": each(DEC, ["feedforward_intermediate_dense", "feedforward_gate_dense", "feedforward_output_dense"]),
        "all-linear": each(DEC, [f"self_attention/{n}" for n in QKVO]
                           + ["feedforward_intermediate_dense", "feedforward_gate_dense", "feedforward_output_dense"]),
    },
    "BERT": {
        "query_value": each(DEC, ["self_attention_layer/query", "self_attention_layer/value"]),
        "attention": each(DEC, [f"self_attention_layer/{n}" for n in QKVO]),
        "mlp": each(DEC, ["feedforward_intermediate_dense", "feedforward_output_dense"]),
        "all-linear": each(DEC, [f"self_attention_layer/{n}" for n in QKVO] + ["feedforward_intermediate_dense", "feedforward_output_dense"]),
    },
    "GPTNeoX": {  # no query_value: KerasHub's LoRA names miss the fused projection (see the error test)
        "attention": each(DEC, ["self_attention/query_key_value", "self_attention/attention_output"]),
        "mlp": each(DEC, ["feedforward_intermediate_dense", "feedforward_output_dense"]),
        "all-linear": each(DEC, ["self_attention/query_key_value", "self_attention/attention_output",
                                 "feedforward_intermediate_dense", "feedforward_output_dense"]),
    },
    "Bart": {  # encoder self-attention; decoder self- and cross-attention
        "query_value": each(ENC, ["self_attention_layer/query", "self_attention_layer/value"])
        + each(BART_DEC, ["self_attention/query", "self_attention/value", "cross_attention/query", "cross_attention/value"]),
        "attention": each(ENC, [f"self_attention_layer/{n}" for n in QKVO])
        + each(BART_DEC, [f"self_attention/{n}" for n in QKVO] + [f"cross_attention/{n}" for n in QKVO]),
        "mlp": each(ENC + BART_DEC, ["feedforward_intermediate_dense", "feedforward_output_dense"]),
        "all-linear": each(ENC, [f"self_attention_layer/{n}" for n in QKVO] + ["feedforward_intermediate_dense", "feedforward_output_dense"])
        + each(BART_DEC, [f"self_attention/{n}" for n in QKVO] + [f"cross_attention/{n}" for n in QKVO]
               + ["feedforward_intermediate_dense", "feedforward_output_dense"]),
    },
    "Mixtral": {  # the experts are raw weights; the router is a Dense that only all-linear takes
        "query_value": each(DEC, ["self_attention/query", "self_attention/value"]),
        "attention": each(DEC, [f"self_attention/{n}" for n in QKVO]),
        "all-linear": each(DEC, [f"self_attention/{n}" for n in QKVO])
        + each(DEC, ["mixtral_sparse_moe_block/sparse_feedforward_gate_dense"]),
    },
}


@pytest.mark.parametrize("family, preset", [(f, p) for f, presets in EXPECTED.items() for p in presets])
def test_each_preset_matches_exactly_these_paths(models, family, preset):
    assert found(models(family), targets=preset) == sorted(EXPECTED[family][preset])


def test_encoder_decoder_blocks_are_the_encoders_then_the_decoders(models):
    bart = models("Bart")
    assert [block.path for block in blocks_of(bart)] == ENC + BART_DEC
    targets = find_targets(bart, InjectionConfig(targets="query_value", blocks=[2, -1]))
    assert sorted((t.block, t.path) for t in targets) == sorted(
        [(2, p) for p in each(BART_DEC[:1], ["self_attention/query", "self_attention/value", "cross_attention/query", "cross_attention/value"])]
        + [(3, p) for p in each(BART_DEC[1:], ["self_attention/query", "self_attention/value", "cross_attention/query", "cross_attention/value"])]
    )
    assert all(getattr(t.parent, t.attr) is t.layer for t in targets)


def test_lists_regexes_and_preset_excludes_keep_working(models):
    bart = models("Bart")
    assert found(bart, targets=["cross_attention/key"]) == each(BART_DEC, ["cross_attention/key"])
    assert found(bart, targets=r"transformer_encoder_layer_1/.*_dense") == each(ENC[1:], ["feedforward_intermediate_dense", "feedforward_output_dense"])
    assert found(bart, targets="all-linear", exclude="attention") == EXPECTED["Bart"]["mlp"]
    assert sorted(layer.path for layer in find_layers(models("GPT2"), "query_value")) == EXPECTED["GPT2"]["query_value"]


def test_query_value_follows_the_backbones_own_lora_names(models):
    """Newer KerasHub names the method `get_lora_target_names`; when a backbone has it, it decides."""
    gpt2 = models("GPT2")
    gpt2.get_lora_target_names = lambda: ["key", "attention_output"]
    try:
        assert found(gpt2, targets="query_value") == each(DEC, ["self_attention/attention_output", "self_attention/key"])
    finally:
        del gpt2.get_lora_target_names
    assert found(gpt2, targets="query_value") == EXPECTED["GPT2"]["query_value"]


def test_a_fused_qkv_projection_is_adapted_as_one_and_stays_exact(models):
    keras.utils.set_random_seed(0)
    neox = keras_hub.models.GPTNeoXBackbone(**BUILD["GPTNeoX"][1])
    x = {"token_ids": np.arange(1, 9)[None].repeat(2, 0), "padding_mask": np.ones((2, 8), "int32")}
    expected = keras.ops.convert_to_numpy(neox(x))
    inject(neox, targets="attention", rank=2)
    assert sorted(neox.injection.paths) == EXPECTED["GPTNeoX"]["attention"]
    steered = keras.ops.convert_to_numpy(neox({**x, "control": np.ones((2, 1), "float32")}))
    assert np.array_equal(steered, expected)  # at insertion: exact


@pytest.mark.parametrize(
    "family, fields, message",
    [
        ("FNet", {"targets": "attention"}, r"targets='attention' found no attention sublayer in the blocks of FNetBackbone\. "
                                           r"They hold feed-forward \['intermediate_dense', 'output_dense'\]\. Use 'mlp' or 'all-linear', or a list"),
        ("FNet", {"targets": "query_value"}, r"targets='query_value' means KerasHub's LoRA layers of FNetBackbone, by name "
                                             r"\['query_dense', 'value_dense', 'query', 'value'\]; none is in its blocks"),
        ("GPTNeoX", {}, r"targets='query_value' means KerasHub's LoRA layers of GPTNeoXBackbone.* They hold attention "
                        r"\[.*'self_attention/query_key_value'.*\]; feed-forward .* Use 'attention' or 'mlp' or 'all-linear'"),
        ("Mixtral", {"targets": "mlp"}, r"targets='mlp' found no feed-forward projection in the blocks of MixtralBackbone \(outside "
                                        r"attention; MoE routers don't count\)\. They hold attention .*; MoE routers "
                                        r"\['mixtral_sparse_moe_block(_\d+)?/sparse_feedforward_gate_dense'.* Use 'attention' or 'all-linear'"),
        ("Llama", {"targets": ["q_proj"]}, r"targets=\['q_proj'\] matched no Dense/EinsumDense layer\. Close candidates: \["),
        ("Bart", {"blocks": [4]}, r"blocks=\[4\] names blocks \[4\] but the model has 4"),
        ("Bart", {"targets": "mlp", "exclude": "all-linear"}, r"targets='mlp' matched no Dense/EinsumDense layer \(after exclude='all-linear'\)"),
    ],
    ids=["FNet-attention", "FNet-query_value", "GPTNeoX-default", "Mixtral-mlp", "Llama-unknown-name", "Bart-block-4", "Bart-excluded-all"],
)
def test_a_preset_the_family_cannot_express_raises_before_any_change(models, family, fields, message):
    backbone = models(family)
    before = state_of(backbone)
    with pytest.raises(ValueError, match=message):
        inject(backbone, rank=2, **fields)
    after = state_of(backbone)
    assert after[0] is before[0] and after[2:] == before[2:] and after[1].keys() == before[1].keys()
    assert all(np.array_equal(after[1][p], v) for p, v in before[1].items())
