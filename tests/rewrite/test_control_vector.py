"""llama.cpp control vectors (GGUF) in and out of a tiny Llama 3 backbone (4 blocks, hidden 16).

The vectors are written with the `gguf` package's GGUFWriter exactly as repeng's
`ControlVector.export_gguf` writes them; `direction.N` is added to the output of block N (counted
from 0), as llama.cpp's `llama_adapter_cvec` does (see keras_biasinject/rewrite/control_vector.py).
"""

import gguf
import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject.layers import BiasInjectDense
from keras_biasinject.rewrite import inject
from keras_biasinject.rewrite.control_vector import export_control_vector, load_control_vector, read_control_vector
from keras_biasinject.layers.control import control_scope
from keras_biasinject.rewrite.injected_model import InjectedModel
from tests.rewrite.tiny_models import TINY

CONFIG = dict(vocabulary_size=64, num_layers=4, hidden_dim=16, intermediate_dim=32, num_query_heads=4, num_key_value_heads=2)
HIDDEN, BLOCKS = CONFIG["hidden_dim"], CONFIG["num_layers"]


def write_vector(path, directions, arch="controlvector", model_hint="llama", layer_count=None):
    """A control vector as repeng's ControlVector.export_gguf writes it: {layer: float32 [n_embd]}."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions) if layer_count is None else layer_count)
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(direction, dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def directions_for(layers, width=HIDDEN, seed=1):
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=width).astype("float32") for layer in layers}


@pytest.fixture(scope="module")
def base_weights():
    keras.utils.set_random_seed(0)
    return keras_hub.models.Llama3Backbone(**CONFIG).get_weights()


@pytest.fixture()
def fresh(base_weights):
    """Makes a new tiny Llama 3 backbone holding the same weights each call."""
    def make():
        backbone = keras_hub.models.Llama3Backbone(**CONFIG)
        backbone.set_weights(base_weights)
        return backbone
    return make


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, CONFIG["vocabulary_size"], (2, 6)).astype("int32"), "padding_mask": np.ones((2, 6), bool)}


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory):
    """Directions for llama.cpp layers 1..3 (blocks 1..3; block 0 is never steered), as repeng writes them."""
    directions = directions_for([1, 2, 3])
    return write_vector(tmp_path_factory.mktemp("cvec") / "vector.gguf", directions), directions


def by_hand(backbone, inputs, directions, strength):
    """The plain backbone run block by block, `strength * direction.N` added to block N's output."""
    x = backbone.token_embedding(inputs["token_ids"])
    for index, block in enumerate(backbone.transformer_layers):
        x = block(x, decoder_padding_mask=inputs["padding_mask"])
        if index in directions:
            x = x + strength * directions[index]
    return np.asarray(backbone.layer_norm(x))


def run(model, inputs, control=None):
    return np.asarray(model(dict(inputs, control=control) if control is not None else inputs))


def test_value_at_a_control_is_the_direction_times_the_control_added_to_each_block_output(fresh, inputs, vector_file):
    path, directions = vector_file
    reference = fresh()
    base = run(reference, inputs)
    model = load_control_vector(fresh(), path, strength=0.5)

    assert isinstance(model, keras_hub.models.Llama3Backbone) and model.injection.config.kind == "bias"
    assert model.injection.paths == [f"transformer_layer_{n}/feedforward_output_dense" for n in (1, 2, 3)]
    assert model.named_controls == {"on": (0.5,)}
    np.testing.assert_array_equal(run(model, inputs), base)  # no control: the base model, bit for bit
    np.testing.assert_array_equal(run(model, inputs, np.zeros((2, 1), "float32")), base)  # strength 0 likewise
    for strength in (0.5, -2.0):
        got = run(model, inputs, np.full((2, 1), strength, "float32"))
        want = by_hand(reference, inputs, directions, strength)
        assert np.max(np.abs(want - base)) > 1e-2  # the vector changes the output, so the check below means something
        # 1e-6: llama.cpp and the hand reference add the vector after the residual add, the adapter before it.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(run(model, inputs, "on"), run(model, inputs, np.full((2, 1), 0.5, "float32")))


def test_round_trip_writes_the_same_tensors_and_gives_identical_outputs(fresh, inputs, vector_file, tmp_path):
    path, directions = vector_file
    model = load_control_vector(fresh(), path)
    out = export_control_vector(model, tmp_path / "out.gguf")

    reader = gguf.GGUFReader(out)  # read with the gguf package, as llama.cpp's format
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2", "direction.3"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [HIDDEN]
        np.testing.assert_array_equal(np.asarray(tensor.data), directions[int(tensor.name.split(".")[1])])

    again = load_control_vector(fresh(), out)
    for control in (np.full((2, 1), 1.5, "float32"), np.full((2, 1), -0.25, "float32"), "on"):
        np.testing.assert_array_equal(run(again, inputs, control), run(model, inputs, control))
    assert not list(tmp_path.glob(".*partial"))  # written through a temporary file, nothing left beside it


def test_export_at_a_control_and_a_layer_range(fresh, inputs, vector_file, tmp_path):
    path, directions = vector_file
    model = load_control_vector(fresh(), path, layer_range=(2, 3))  # as --control-vector-layer-range 2 3
    assert model.injection.paths == [f"transformer_layer_{n}/feedforward_output_dense" for n in (2, 3)]
    want = by_hand(fresh(), inputs, {n: directions[n] for n in (2, 3)}, 0.75)
    np.testing.assert_allclose(run(model, inputs, np.full((2, 1), 0.75, "float32")), want, rtol=0, atol=1e-6)

    model.add_control("strong", [3.0])
    written = read_control_vector(export_control_vector(model, tmp_path / "strong.gguf", control="strong", model_hint="smollm"))
    assert written.model_hint == "smollm" and sorted(written.directions) == [2, 3]
    for n in (2, 3):  # at scale 1 llama.cpp computes what the model computes at control 3
        np.testing.assert_array_equal(written.directions[n], directions[n] * np.float32(3.0))


def test_export_of_a_bias_injection_made_with_inject(fresh, tmp_path):
    model = inject(fresh(), targets=[f"transformer_layer_{n}/feedforward_output_dense" for n in range(BLOCKS)], kind="bias")
    block0 = model.transformer_layers[0]._feedforward_output_dense
    assert isinstance(block0, BiasInjectDense)
    for n in range(1, BLOCKS):  # as training would
        v = model.transformer_layers[n]._feedforward_output_dense.control_kernel
        v.assign(np.full(v.shape, n, "float32"))
    written = read_control_vector(export_control_vector(model, tmp_path / "trained.gguf"))
    assert sorted(written.directions) == [1, 2, 3]  # block 0's V is zero: llama.cpp has no direction.0
    np.testing.assert_array_equal(written.directions[3], np.full(HIDDEN, 3.0, "float32"))

    block0.control_kernel.assign(np.ones(block0.control_kernel.shape, "float32"))
    with pytest.raises(ValueError, match=r"block 0.*never steers the output of the first block"):
        export_control_vector(model, tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()


def test_export_refuses_what_a_control_vector_cannot_hold(fresh, tmp_path):
    with pytest.raises(ValueError, match="plain Llama3Backbone"):
        export_control_vector(fresh(), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="kind='lora_bias', control_dim=1"):
        export_control_vector(inject(fresh(), targets="mlp"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"'transformer_layer_0/self_attention/query'.*adds only to each block's output"):
        export_control_vector(inject(fresh(), targets="query_value", kind="bias"), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_a_model_hint_of_another_family_warns_and_loads(fresh, tmp_path):
    path = write_vector(tmp_path / "qwen.gguf", directions_for([1]), model_hint="qwen2")
    with pytest.warns(UserWarning, match=r"model_hint 'qwen2'.*Llama3Backbone"):
        model = load_control_vector(fresh(), path)
    assert isinstance(model, InjectedModel)


HINTS = {"Llama": "llama", "Mistral": "mistral", "Qwen": "qwen2", "Qwen3": "qwen3", "Phi3": "phi3", "Gemma": "gemma", "GPT2": "gpt2"}


@pytest.mark.parametrize("family", list(HINTS))
def test_each_supported_family_adds_the_direction_to_the_block_output(family, tmp_path):
    spec = TINY[family]  # 2 blocks, hidden 16: only direction.1 (block 1) can be steered
    keras.utils.set_random_seed(0)
    backbone = getattr(keras_hub.models, spec.backbone)(**spec.kwargs)
    block = backbone.transformer_layers[1]
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    base = np.asarray(block(x))
    direction = directions_for([1])[1]
    load_control_vector(backbone, write_vector(tmp_path / "v.gguf", {1: direction}, model_hint=HINTS[family]), strength=2.0)
    with control_scope(np.full((2, 1), 2.0, "float32")):
        steered = np.asarray(block(x))
    np.testing.assert_allclose(steered, base + 2.0 * direction, rtol=0, atol=1e-6)  # the add point, up to float rounding
    np.testing.assert_array_equal(np.asarray(block(x)), base)  # no control: the block as it was


@pytest.fixture(scope="module")
def untouched(base_weights):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(**CONFIG)
    backbone.set_weights(base_weights)
    return backbone


def _bad_files(folder):
    return {
        "width": (write_vector(folder / "narrow.gguf", directions_for([1, 2], width=8)),
                  r"narrow.gguf.*'direction.1' has width 8, but Llama3Backbone's hidden size is 16.*Use a control vector made for this model"),
        "depth": (write_vector(folder / "deep.gguf", directions_for([1, 2, 3, 4, 5])),
                  r"deep.gguf.*'direction.4'.*has 4 blocks, so llama.cpp layers 1..3.*layer_range=\(1, 3\)"),
        "architecture": (write_vector(folder / "model.gguf", directions_for([1]), arch="llama"),
                         r"model.gguf.*general.architecture is 'llama', not 'controlvector'.*Pass a control vector file"),
        "not gguf": (folder / "notes.txt", r"notes.txt.*is not a GGUF file.*\.gguf"),
        "layer 0": (write_vector(folder / "zero.gguf", directions_for([0, 1])),
                    r"zero.gguf.*tensor 'direction.0' is not a direction of a layer.*N >= 1"),
        "mixed widths": (write_vector(folder / "mixed.gguf", {1: np.ones(16), 2: np.ones(12)}),
                         r"mixed.gguf.*'direction.2' has width 12, but the directions before it have width 16"),
        "not finite": (write_vector(folder / "nan.gguf", {1: np.full(16, np.nan)}), r"nan.gguf.*'direction.1' holds NaN"),
    }


@pytest.mark.parametrize("case", ["width", "depth", "architecture", "not gguf", "layer 0", "mixed widths", "not finite"])
def test_bad_files_raise_naming_the_file_and_leave_the_model_unchanged(untouched, inputs, tmp_path, case):
    (tmp_path / "notes.txt").write_text("direction.1 = [1, 2, 3]\n")
    path, message = _bad_files(tmp_path)[case]
    before = run(untouched, inputs)
    with pytest.raises(ValueError, match=message):
        load_control_vector(untouched, path)
    assert type(untouched) is keras_hub.models.Llama3Backbone and not hasattr(untouched, "_kbi_undo")
    assert not any(isinstance(layer, BiasInjectDense) for layer in untouched._flatten_layers())
    np.testing.assert_array_equal(run(untouched, inputs), before)


def test_bad_arguments_and_families_raise_before_the_model_changes(untouched, vector_file):
    path, _ = vector_file
    with pytest.raises(ValueError, match=r"`strength` must be a finite number. Got strength=nan"):
        load_control_vector(untouched, path, strength=float("nan"))
    with pytest.raises(ValueError, match=r"layer_range.*start <= end. Got layer_range=\(3, 1\)"):
        load_control_vector(untouched, path, layer_range=(3, 1))
    with pytest.raises(ValueError, match=r"layer_range=\(4, 9\) keeps none of the directions"):
        load_control_vector(untouched, path, layer_range=(4, 9))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_control_vector(untouched, path.parent / "missing.gguf")
    assert type(untouched) is keras_hub.models.Llama3Backbone

    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                                         max_sequence_length=16)
    with pytest.raises(ValueError, match=r"BertBackbone cannot carry a llama.cpp control vector.*TransformerEncoder.*post-norm"):
        load_control_vector(bert, path)
    assert type(bert) is keras_hub.models.BertBackbone
    gemma2 = keras_hub.models.GemmaBackbone(**TINY["Gemma"].kwargs, use_post_ffw_norm=True)  # as Gemma 2
    with pytest.raises(ValueError, match=r"GemmaBackbone cannot.*normalise the feed-forward output before the residual add"):
        load_control_vector(gemma2, path)


def test_an_injected_model_is_refused(fresh, vector_file):
    path, _ = vector_file
    model = load_control_vector(fresh(), path)
    with pytest.raises(ValueError, match="already injected"):
        load_control_vector(model, path)
