"""load_peft_adapter / export_peft on the real SmolLM2-135M against PyTorch with PEFT itself.

One Keras SmolLM2 backbone and one transformers LlamaForCausalLM (both from the converted folder) serve
the whole module; the tests run in file order: refusals on the plain model, then the import, then the export.
"""

import json
import shutil

import numpy as np
import peft  # the test extra installs peft, transformers and torch: a missing one fails, it is not skipped
import pytest
import torch
import transformers

from keras_biasinject import inject, remove
from keras_biasinject.models import load
from keras_biasinject.models.load import resolve_preset
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.peft_adapter import export_peft, load_peft_adapter, read_safetensors

pytestmark = pytest.mark.slow

# float32 through 30 layers with logits up to ~30: the plain base already differs between KerasHub and
# transformers by up to ~8e-5 (measured and printed below), so the adapted models are held to 1e-4.
TOLERANCE = 1e-4
# After export, PEFT's model runs our weights re-factored into LoRA A/B at one control: one more float32
# rounding of every adapted kernel on top of the ~8e-5 floor. 1.01e-4 is measured (1 of 1,081,344 logits
# above 1e-4; it was below 1e-4 with an earlier torch), so the exported folder is held to 1.5e-4.
EXPORT_TOLERANCE = 1.5e-4
PROMPTS = ["The capital of France is Paris, and the capital of", "Once upon a time, in a small village, there"]


@pytest.fixture(scope="module")
def smollm2():
    """(Keras backbone, transformers model, token ids [2, T], Keras base logits, transformers base logits)."""
    folder = resolve_preset("smollm2-135m")
    backbone = load("smollm2-135m")
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ids = np.array([row[: min(map(len, rows))] for row in rows])
    return backbone, reference, ids, keras_logits(backbone, ids), torch_logits(reference, ids)


def keras_logits(backbone, ids, control=None):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    if control is not None:
        inputs["control"] = control
    return np.asarray(backbone.token_embedding(backbone(inputs), reverse=True))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def peft_lora(smollm2, tmp_path_factory):
    """A PEFT LoRA on the transformers model (r=4, per-module rank and alpha), saved: (PeftModel, folder, logits)."""
    _, reference, ids, _, _ = smollm2
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16},
    )
    torch.manual_seed(0)  # A (PEFT's kaiming init) and B: the same adapter on every run
    model = peft.get_peft_model(reference, config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the update non-zero
                weight.normal_(0.0, 0.02)
    folder = tmp_path_factory.mktemp("peft") / "lora"
    model.save_pretrained(folder)
    return model, folder, torch_logits(model, ids)


def state(backbone):
    return [np.array(w) for w in backbone.weights]


def assert_same_state(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def tampered(source, target, config=None, tensors=None):
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        from safetensors.numpy import save_file

        weights = read_safetensors(source / "adapter_model.safetensors", "test")
        save_file(tensors(weights), target / "adapter_model.safetensors")
    return target


def test_bad_peft_folders_raise_and_leave_the_model_unchanged(smollm2, peft_lora, tmp_path):
    backbone = smollm2[0]
    folder = peft_lora[1]
    assert not isinstance(backbone, InjectedModel)
    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    cases = [
        (dict(config={"use_dora": True}), r"sets use_dora=True \(DoRA .*Train the PEFT adapter without `use_dora`"),
        (dict(config={"target_modules": ["q_proj", "lm_head"]}), r"target_modules names 'lm_head'"),
        (dict(config={"peft_type": "IA3"}), r"peft_type='IA3'; only LoRA"),
        (dict(config={"init_lora_weights": "pissa"}), r"init_lora_weights='pissa'"),
        (dict(config={"modules_to_save": ["lm_head"]}), r"sets modules_to_save=\['lm_head'\]"),
        (dict(tensors=lambda t: {**t, key: np.zeros((4, 960), np.float32)}),  # another base: hidden 960
         rf"adapter_model\.safetensors'?: tensor '{key}' has shape \[4, 960\], but layer "
         r"'transformer_layer_3/self_attention/query'.*another base"),
        (dict(tensors=lambda t: {**t, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 576), np.float32)}),
         r"tensor 'base_model\.model\.lm_head\.lora_A\.weight' is not the LoRA A/B weight"),
        (dict(tensors=lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.v_proj.lora_B" not in k}),
         r"no tensor 'base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_B\.weight'"),
    ]
    before = state(backbone)
    for i, (change, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            load_peft_adapter(backbone, tampered(folder, tmp_path / str(i), **change))
    with pytest.raises(ValueError, match=r"has no adapter_config\.json; pass a folder written by PEFT"):
        load_peft_adapter(backbone, tmp_path)
    assert not isinstance(backbone, InjectedModel)
    assert_same_state(before, state(backbone))


@pytest.fixture(scope="module")
def imported(smollm2, peft_lora):
    return load_peft_adapter(smollm2[0], peft_lora[1])


def test_imported_lora_matches_peft(smollm2, peft_lora, imported):
    _, _, ids, keras_base, torch_base = smollm2
    want = peft_lora[2]
    base_diff = np.abs(keras_base - torch_base).max()
    got = keras_logits(imported, ids)
    diff = np.abs(got - want).max()
    print(f"max |logits| difference: base {base_diff:.2e}, with the imported LoRA {diff:.2e}")
    assert np.abs(want - torch_base).max() > 0.05  # the LoRA changes the logits
    assert diff <= TOLERANCE
    assert imported.injection.config.gate == "always"
    assert len(imported.injection.paths) == 4 * 30
    # q/v share one B over their heads: PEFT rank 4 becomes 4 x 9 query heads; scales are folded into B.
    assert imported.injection.config.rank == 36 and imported.injection.config.alpha == 36


def test_control_turns_the_imported_lora_off_and_scales_it(smollm2, peft_lora, imported):
    _, _, ids, keras_base, _ = smollm2
    np.testing.assert_array_equal(keras_logits(imported, ids, "off"), keras_base)  # exactly the base
    model = peft_lora[0]
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for layer in layers:
        layer.scale_layer(1.5)
    try:
        want = torch_logits(model, ids)
    finally:
        for layer in layers:
            layer.unscale_layer(1.5)
    np.testing.assert_allclose(keras_logits(imported, ids, np.array([[0.5], [0.5]])), want, atol=TOLERANCE, rtol=0)


def test_export_at_a_control_loads_in_peft_with_the_same_logits(smollm2, peft_lora, imported, tmp_path):
    ids = smollm2[2]
    # At the neutral control the imported adapter goes back at PEFT's own ranks.
    neutral = export_peft(imported, tmp_path / "neutral")
    config = json.loads((neutral / "adapter_config.json").read_text())
    ranks = (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"])
    assert ranks == (4, 4, {"down_proj": 2}, {"down_proj": 2})
    assert config["lora_bias"] is False and config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]

    rng = np.random.default_rng(0)
    adapters = [a for a in imported._flatten_layers(include_self=False) if hasattr(a, "control_gain")]
    for adapter in adapters[::7]:  # trained-looking gains and control biases on some adapters
        adapter.control_gain.assign(rng.normal(1.0, 0.25, adapter.control_gain.shape).astype("float32"))
        adapter.control_kernel.assign(rng.normal(0.0, 0.02, adapter.control_kernel.shape).astype("float32"))
    ours = keras_logits(imported, ids, np.array([[0.7], [0.7]]))
    folder = export_peft(imported, tmp_path / "exported", control=[0.7])
    assert json.loads((folder / "adapter_config.json").read_text())["lora_bias"] is True

    base = peft_lora[0].unload()  # the transformers model without LoRA layers
    model = peft.PeftModel.from_pretrained(base, neutral).eval()
    # PEFT against PEFT: the re-factored weights differ from the originals only by float32 rounding, which
    # 30 layers amplify to about 5e-5 to 7e-5 on these logits (4.9e-5 and 7.3e-5 measured with two torch versions): the float32 noise floor of SmolLM2.
    again = torch_logits(model, ids)
    print(f"max |logits| difference, PEFT against PEFT re-factored: {np.abs(again - peft_lora[2]).max():.2e}")
    np.testing.assert_allclose(again, peft_lora[2], atol=TOLERANCE, rtol=0)
    base = model.unload()
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    got = torch_logits(model, ids)
    print(f"max |logits| difference after export: {np.abs(got - ours).max():.2e}")
    np.testing.assert_allclose(got, ours, atol=EXPORT_TOLERANCE, rtol=0)
    model.unload()

    # A constant bias has no place in our adapters: that folder does not come back.
    plain = remove(imported)
    before = state(plain)
    with pytest.raises(ValueError, match=r"lora_bias=True and tensor '.*lora_B\.bias' is not zero"):
        load_peft_adapter(plain, folder)
    assert not isinstance(plain, InjectedModel)
    assert_same_state(before, state(plain))


def test_bias_kind_exports_as_a_zero_lora_with_a_bias(smollm2, tmp_path):
    """Runs after the export test: the backbone is plain again."""
    backbone, reference, ids = smollm2[:3]
    assert not isinstance(backbone, InjectedModel), "the export test above failed and left the shared backbone injected"
    injected = inject(backbone, kind="bias", targets=["query", "feedforward_output_dense"], blocks=[0, 5])
    rng = np.random.default_rng(1)
    for adapter in [a for a in injected._flatten_layers(include_self=False) if hasattr(a, "control_kernel")]:
        adapter.control_kernel.assign(rng.normal(0.0, 0.05, adapter.control_kernel.shape).astype("float32"))
    folder = export_peft(injected, tmp_path / "bias", control=[1.0])
    assert json.loads((folder / "adapter_config.json").read_text())["layers_to_transform"] == [0, 5]
    model = peft.PeftModel.from_pretrained(reference, folder).eval()
    np.testing.assert_allclose(torch_logits(model, ids), keras_logits(injected, ids, np.array([[1.0], [1.0]])),
                               atol=EXPORT_TOLERANCE, rtol=0)
    model.unload()
    remove(injected)
