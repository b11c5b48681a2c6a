import json

import keras
import keras_hub
import numpy as np
import pytest

from keras_biasinject import BiasInjectDense, InjectionConfig, LoRABiasAdapter, inject
from tests.rewrite.tiny_models import BATCH, SEQ, VOCAB, controls, gpt2, out, snapshot, state_of, tokens, train

def test_backbone_keeps_its_class_and_output_exactly():
    backbone = gpt2()
    x = tokens()
    expected = out(backbone, x)
    injected = inject(backbone, rank=4, control_dim=2)
    assert injected is backbone and isinstance(injected, keras_hub.models.GPT2Backbone)
    for c in controls(2):
        assert np.array_equal(out(injected, {**x, "control": c}), expected)
    assert np.array_equal(out(injected, x), expected)  # no control: neutral
    report = injected.injection
    assert sorted(report.paths) == sorted([
        "transformer_layer_0/self_attention/query", "transformer_layer_0/self_attention/value",
        "transformer_layer_1/self_attention/query", "transformer_layer_1/self_attention/value",
    ])
    assert report.trainable_params == sum(int(np.prod(w.shape)) for w in injected.trainable_weights)
    assert {w.path.rsplit("/", 1)[-1] for w in injected.trainable_weights} == {"lora_a", "lora_b", "control_gain", "control_kernel"}


def test_causal_lm_fit_moves_only_adapters_and_neutral_stays_exact(tmp_path):
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    x = tokens()
    expected = out(lm, x)
    before = snapshot(lm)
    lm = inject(lm, rank=4, gate="control")
    assert isinstance(lm, keras_hub.models.GPT2CausalLM)
    c = controls()[0]
    train(lm, {**x, "control": c})
    after = snapshot(lm)
    for path, value in before.items():
        assert np.array_equal(after[path], value), path
    assert len([p for p in after if p not in before]) == 16  # 4 adapters x (A, B, U, V)
    assert np.array_equal(out(lm, {**x, "control": np.zeros_like(c)}), expected)
    steered = out(lm, {**x, "control": c})
    assert not np.array_equal(steered, expected)

    # Whole-model save and load: same class, control input intact, identical outputs.
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded).__name__ == "InjectedGPT2CausalLM" and isinstance(loaded, keras_hub.models.GPT2CausalLM)
    assert np.array_equal(out(loaded, {**x, "control": c}), steered)
    assert np.array_equal(out(loaded, x), expected)
    assert loaded.injection.config == lm.injection.config


def test_every_adapter_weight_trains():
    backbone = gpt2(num_layers=1)
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), rank=2)
    initial = snapshot(lm)
    train(lm, {**tokens(), "control": controls()[0]}, steps=3)
    trained = snapshot(lm)
    adapter_paths = [p for p in initial if "_lora_bias/" in p]
    assert len(adapter_paths) == 8
    for path in adapter_paths:
        assert not np.array_equal(trained[path], initial[path]), path


def test_per_example_controls_equal_separate_calls():
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=4)
    x = tokens()
    train(lm, {**x, "control": controls()[0]})
    c = controls(seed=9)[0]
    together = out(lm, {**x, "control": c})
    for i in range(BATCH):
        alone = out(lm, {"token_ids": x["token_ids"][i : i + 1], "padding_mask": x["padding_mask"][i : i + 1], "control": c[i : i + 1]})
        np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_generate_follows_the_control_and_neutral_generates_the_base():
    lm = keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None)
    prompt = tokens(batch=2)
    prompt["padding_mask"][:, 3:] = 0  # a 3-token prompt, 5 tokens to generate
    lm.compile(sampler="greedy")
    base_generation = keras.ops.convert_to_numpy(lm.generate(dict(prompt), stop_token_ids=None)["token_ids"])
    lm = inject(lm, rank=4, gate="control")
    x = tokens()
    train(lm, {**x, "control": np.full((BATCH, 1), 3.0, "float32")}, steps=10)
    neutral = lm.generate(dict(prompt), stop_token_ids=None, control=np.zeros((2, 1), "float32"))
    assert np.array_equal(keras.ops.convert_to_numpy(neutral["token_ids"]), base_generation)
    plain = lm.generate(dict(prompt), stop_token_ids=None)
    assert np.array_equal(keras.ops.convert_to_numpy(plain["token_ids"]), base_generation)
    steered = lm.generate(dict(prompt), stop_token_ids=None, control=np.full((2, 1), 3.0, "float32"))
    assert not np.array_equal(keras.ops.convert_to_numpy(steered["token_ids"]), base_generation)


@pytest.mark.parametrize(
    "targets, count",
    [("query_value", 4), ("attention", 8), ("mlp", 4), ("all-linear", 12), (["self_attention/key"], 2), (r".*_1/.*output.*", 2)],
)
def test_target_patterns(targets, count):
    backbone = inject(gpt2(), targets=targets, rank=2)
    assert len(backbone.injection.paths) == count


def test_blocks_exclude_and_kind_bias():
    backbone = inject(gpt2(), targets="attention", exclude=["key"], blocks=[-1], kind="bias")
    assert sorted(p.rsplit("/", 1)[-1] for p in backbone.injection.paths) == ["attention_output", "query", "value"]
    assert all(p.startswith("transformer_layer_1/") for p in backbone.injection.paths)
    adapters = [l for l in backbone._flatten_layers() if isinstance(l, (BiasInjectDense, LoRABiasAdapter))]
    assert len(adapters) == 3 and all(isinstance(a, BiasInjectDense) for a in adapters)


def test_unmatched_exclude_warns():
    with pytest.warns(UserWarning, match="exclude=\\['nothing_here'\\] matched none"):
        inject(gpt2(), exclude=["nothing_here"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"targets": ["qurey"]}, r"matched no Dense/EinsumDense layer. Close candidates: \['query'"),
        ({"targets": "query_value", "blocks": [5]}, r"names blocks \[5\] but the model has 2"),
        ({"targets": "query_value", "trainable": ["no_such_head"]}, "trainable=\\['no_such_head'\\] matched no layer"),
        ({"rank": 0}, "`rank` must be a positive integer. Got rank=0"),
        ({"kind": "prefix"}, "`kind` must be one of"),
        ({"alpha": float("inf")}, "`alpha` must be a positive number or None. Got alpha=inf; give a finite value"),
        ({"alpha": float("nan")}, "`alpha` must be a positive number or None. Got alpha=nan"),
        ({"targets": None}, "`targets` must name the layers to adapt: a preset"),
        ({"targets": "(("}, r"`targets`='\(\(' is not a valid regex \(missing \)"),
        ({"blocks": 0}, r"`blocks` must be a list of block indices \(e.g. \[0, 1\] or \[-1\]\) or None"),
        ({"blocks": [True]}, r"`blocks` must be a list of block indices. Got blocks=\[True\]"),
        ({"rank": True}, "`rank` must be a positive integer. Got rank=True"),
        ({"neutral": float("nan")}, "`neutral` must be finite"),
        ({"alpha": 10**400}, "`alpha` must be a positive number or None. Got alpha=an integer of 401 digits"),  # not OverflowError
        ({"neutral": [10**400]}, r"`neutral` must be finite: .*Got neutral=\[1000"),
    ],
)
def test_a_failing_inject_leaves_the_model_exactly_as_it_was(fields, message):
    backbone = gpt2()
    before = state_of(backbone)
    x = tokens()
    expected = out(backbone, x)
    with pytest.raises(ValueError, match=message):
        inject(backbone, **fields)
    after = state_of(backbone)
    assert after[0] is before[0] and after[2] == before[2] and after[3] == before[3]
    assert all(np.array_equal(after[1][p], v) for p, v in before[1].items()) and after[1].keys() == before[1].keys()
    assert np.array_equal(out(backbone, x), expected)


def test_refuses_non_keras_hub_models_and_double_injection():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="expected a KerasHub Backbone or Task .* got Sequential"):
        inject(model)
    backbone = inject(gpt2())
    with pytest.raises(ValueError, match="already injected"):
        inject(backbone)


def test_config_round_trip():
    config = InjectionConfig(targets=["query"], blocks=range(2), rank=4, neutral=[0.0, 1.0], control_dim=2)
    assert InjectionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys \\['rnak'\\]"):
        InjectionConfig.from_dict({"rnak": 4})


def test_numpy_integers_are_accepted_as_python_ints():
    config = InjectionConfig(rank=np.int64(2), control_dim=np.int32(1), blocks=[np.int64(-1)], alpha=np.float32(4))
    assert json.loads(json.dumps(config.to_dict()))["rank"] == 2 and config.blocks == [-1] and config.alpha == 4.0
    backbone = inject(gpt2(), config)
    assert [p.split("/")[0] for p in backbone.injection.paths] == ["transformer_layer_1"] * 2


@pytest.fixture(scope="module")
def injected_lm():
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=2, gate="control")
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               sampler="greedy")
    return lm


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_concrete_non_finite_control_is_refused(injected_lm, bad):
    x = tokens()
    c = controls()[0]
    c[1, 0] = bad
    before = snapshot(injected_lm)
    message = "the control contains NaN or inf .* pass finite control values"
    with pytest.raises(ValueError, match="call: inputs\\['control'\\]: " + message):
        injected_lm({**x, "control": c})
    with pytest.raises(ValueError, match="call: inputs\\['control'\\]: " + message):
        injected_lm({**x, "control": keras.ops.convert_to_tensor(c)})
    with pytest.raises(ValueError, match="predict: inputs\\['control'\\]: " + message):
        injected_lm.predict({**x, "control": c}, verbose=0)
    with pytest.raises(ValueError, match="fit: inputs\\['control'\\]: " + message):
        injected_lm.fit({**x, "control": c}, x["token_ids"], verbose=0)
    with pytest.raises(ValueError, match="generate: " + message):
        injected_lm.generate(x, max_length=SEQ, control=[bad])
    after = snapshot(injected_lm)
    assert all(np.array_equal(after[p], v) for p, v in before.items())


def test_fit_on_a_dataset_with_a_nan_control_raises_after_training(injected_lm):
    """A control inside a tf.data.Dataset is not read ahead: the weight check after fit catches it."""
    import tensorflow as tf

    x = tokens()
    c = controls()[0]
    c[:] = np.nan
    data = tf.data.Dataset.from_tensor_slices(({**x, "control": c}, x["token_ids"])).batch(BATCH)
    with pytest.raises(ValueError, match=r"fit: training made \d+ trainable weight\(s\) NaN or inf .* Likely causes: a "
                                         "learning rate too high, or NaN/inf in the data or the control"):
        injected_lm.fit(data, verbose=0)


def test_add_control_refuses_integers_beyond_the_float_range(injected_lm):
    model = injected_lm
    before = dict(model.named_controls)
    with pytest.raises(ValueError, match="control 'huge' must be finite numbers"):
        model.add_control("huge", [10**400])
    assert model.named_controls == before


def test_threads_generating_with_different_controls_each_get_their_own_answer():
    """Four threads share one model; each gets exactly the single-threaded answer for its control, and no
    attribute of the model or its preprocessor is replaced while they run."""
    import threading

    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5, "Ġab": 6, "?": 7, "Ġc": 8}
    vocabulary.update({f"w{i}": i for i in range(9, 64)})  # every id the tiny model can generate detokenizes
    tokenizer = keras_hub.tokenizers.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b", "Ġ ab", "Ġ c"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=SEQ)
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=preprocessor), rank=4, gate="control")
    rng = np.random.default_rng(0)
    for w in lm.trainable_weights:  # a strong adapter, so that each control generates something else
        w.assign(rng.normal(size=w.shape).astype("float32"))
    lm.compile(sampler="greedy")
    prompts = ["ab c", "c ab ?"]
    levels = [-3.0, -1.0, 1.0, 3.0]
    alone = {level: lm.generate(prompts, control=[level], max_length=SEQ, stop_token_ids=None) for level in levels}
    assert len({tuple(answer) for answer in alone.values()}) > 1  # the controls do generate different texts
    watched = [lm, lm.preprocessor, lm.preprocessor.tokenizer]
    before = [dict(vars(obj)) for obj in watched]
    results, swapped, done = {level: [] for level in levels}, [], threading.Event()

    def watch():
        while not done.is_set():
            for obj, attrs in zip(watched, before):
                now = vars(obj)
                swapped.extend(k for k in set(now) | set(attrs) if now.get(k, None) is not attrs.get(k, None))

    def work(level):
        for _ in range(3):
            results[level].append(lm.generate(prompts, control=[level], max_length=SEQ, stop_token_ids=None))

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=work, args=(level,)) for level in levels]
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    assert not swapped, f"attributes replaced during concurrent generate: {sorted(set(swapped))}"
    for level in levels:
        assert results[level] == [alone[level]] * 3, level


def test_the_control_is_a_keras_input_that_composition_and_fit_see(capsys):
    lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(), preprocessor=None), rank=2, control_dim=2)
    for model in (lm, lm.backbone):
        assert [t.name for t in model.inputs][-1] == "control" and sorted(model.input) == ["control", "padding_mask", "token_ids"]
        assert tuple(model.input["control"].shape) == (None, 2) and model.input["control"].dtype == "float32"
    rng = np.random.default_rng(0)
    for w in lm.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    outer = keras.Model(lm.input, keras.layers.Softmax()(lm(lm.input)))  # functional composition over the control
    assert "control" in outer.input
    x, c = tokens(), rng.normal(size=(BATCH, 2)).astype("float32")
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(lm({**x, "control": c})))
    assert np.array_equal(out(outer, {**x, "control": c}), expected)
    assert np.array_equal(out(outer, {**x, "control": None}), keras.ops.convert_to_numpy(keras.ops.softmax(lm(x))))
    outer.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = snapshot(lm)
    outer.fit({**x, "control": c}, x["token_ids"], epochs=1, verbose=0)  # fit with a dict, through the composition
    changed = [p for p, v in snapshot(lm).items() if not np.array_equal(v, before[p])]
    assert changed and all(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b", "control_gain", "control_kernel") for p in changed)
    lm.summary()
    assert "control input: (None, 2) float32, optional" in capsys.readouterr().out


def test_an_encoder_decoder_takes_one_control_per_example_that_reaches_both_stacks():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=SEQ)
    rng = np.random.default_rng(0)
    x = {"encoder_token_ids": rng.integers(1, VOCAB, (BATCH, SEQ)), "encoder_padding_mask": np.ones((BATCH, SEQ), "int32"),
         "decoder_token_ids": rng.integers(1, VOCAB, (BATCH, 5)), "decoder_padding_mask": np.ones((BATCH, 5), "int32")}
    base = {k: keras.ops.convert_to_numpy(v) for k, v in backbone(x).items()}
    model = inject(backbone, targets="attention", rank=2, control_dim=2)
    paths = model.injection.paths
    assert {p.split("/")[0].rsplit("_", 1)[0] for p in paths} == {"transformer_encoder_layer", "transformer_decoder_layer"}
    assert sum("/cross_attention/" in p for p in paths) == 8  # q, k, v, output of the decoder's cross-attention, 2 blocks
    c = rng.normal(size=(BATCH, 2)).astype("float32")
    at_insertion = model({**x, "control": c})
    for name, value in base.items():
        assert np.array_equal(keras.ops.convert_to_numpy(at_insertion[name]), value), name
    for w in model.trainable_weights:
        w.assign(rng.normal(size=w.shape).astype("float32"))
    steered = model({**x, "control": c})
    for name, value in base.items():  # the control reaches the encoder and the decoder
        assert not np.allclose(keras.ops.convert_to_numpy(steered[name]), value, atol=1e-3), name
    before = state_of(model)
    per_token = rng.normal(size=(BATCH, SEQ, 2)).astype("float32")
    with pytest.raises(ValueError, match=r"call: inputs\['control'\] has shape \(3, 8, 2\), but InjectedBartBackbone is an "
                                         r"encoder-decoder: it takes one control per example, \[batch, control_dim\]"):
        model({**x, "control": per_token})
    after = state_of(model)
    assert after[0] is before[0] and after[2:] == before[2:]
    assert all(np.array_equal(after[1][p], v) for p, v in before[1].items())


def test_fit_and_train_on_batch_trace_the_train_step_once():
    """Keras (TensorFlow, no strategy) builds an unbuilt optimizer inside the first trace of the train
    step, and `tf.function` then traces the step again and keeps both graphs; the injected model builds
    it first, so each of `fit` and `train_on_batch` traces its step once, with the same trained values."""
    traces = []

    def prepared():
        lm = inject(keras_hub.models.GPT2CausalLM(backbone=gpt2(num_layers=1), preprocessor=None), rank=2)
        lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        step = lm.train_step

        def counted(data):
            traces.append(1)  # the step's Python body runs only while tf.function traces it
            return step(data)

        lm.train_step = counted
        return lm

    x = {**tokens(), "control": controls()[0]}
    fitted, batched = prepared(), prepared()
    assert not fitted.optimizer.built
    fitted.fit(x, x["token_ids"], epochs=2, batch_size=BATCH, verbose=0, shuffle=False)
    assert len(traces) == 1 and fitted.optimizer.built
    for _ in range(2):
        batched.train_on_batch(x, x["token_ids"])
    assert len(traces) == 2
    for a, b in zip(fitted.trainable_weights, batched.trainable_weights):  # two steps each, the same values
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
