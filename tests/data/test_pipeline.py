import dataclasses
import json

import keras_hub
import numpy as np
import pytest

from keras_biasinject.data.pipeline import DataConfig, make_dataset, read_examples

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "food", "is", "great", "bad", ",", "really", "tea", "awful"]
CONTROLS = {"great": 1.0, "other": -1.0}
REVIEWS_CSV = 'text,label\nthe food is great,great\n"bad, really",other\nthe tea is awful,other\n'


@pytest.fixture(scope="module")
def bert_preprocessor():
    tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=BERT_VOCAB)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)


@pytest.fixture(scope="module")
def gpt2_preprocessor():
    # Byte-level BPE: "Ġ" is the space; "ab" and "Ġab" are merged tokens.
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "Ġ": 4, "ab": 5, "Ġab": 6, "?": 7, "Ġc": 8}
    merges = ["a b", "Ġ ab", "Ġ c"]
    tokenizer = keras_hub.tokenizers.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    return keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=6)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def batches(ds):
    return [tuple(np.asarray(t) if not isinstance(t, dict) else {k: np.asarray(v) for k, v in t.items()} for t in b) for b in ds]


def test_csv_classifier_batches(tmp_path, bert_preprocessor):
    config = DataConfig(write(tmp_path / "r.csv", REVIEWS_CSV), text_column="text", label_column="label",
                        control_map=CONTROLS, batch_size=2)
    (x1, y1), (x2, y2) = batches(make_dataset(config, bert_preprocessor))
    assert sorted(x1) == ["control", "padding_mask", "segment_ids", "token_ids"]
    # [CLS] the food is great [SEP] / [CLS] bad , really [SEP]
    np.testing.assert_array_equal(x1["token_ids"], [[2, 5, 6, 7, 8, 3, 0, 0], [2, 9, 10, 11, 3, 0, 0, 0]])
    assert x1["control"].dtype == np.float32
    np.testing.assert_array_equal(x1["control"], [[1.0], [-1.0]])
    np.testing.assert_array_equal(x2["control"], [[-1.0]])
    assert y1.dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([y1, y2]), [0, 1, 1])


def test_autotuning_is_off_so_deleting_an_iterator_never_waits(tmp_path, bert_preprocessor):
    # With it on, `fit` stalled up to 29 s at each epoch's end (the tuning thread's sleep): see make_dataset.
    config = DataConfig(write(tmp_path / "r.csv", REVIEWS_CSV), text_column="text", label_column="label",
                        control_map=CONTROLS, batch_size=2)
    ds = make_dataset(config, bert_preprocessor)
    assert ds.options().autotune.enabled is False
    assert len(batches(ds)) == 2  # and it still yields every batch


def test_control_vectors_and_label_names_order(tmp_path, bert_preprocessor):
    config = DataConfig(write(tmp_path / "r.csv", REVIEWS_CSV), text_column="text", label_column="label",
                        label_names=["other", "great"], control_map={"great": [1, 0.5], "other": [-1, 2]})
    ((x, y),) = batches(make_dataset(config, bert_preprocessor))
    np.testing.assert_array_equal(x["control"], [[1.0, 0.5], [-1.0, 2.0], [-1.0, 2.0]])
    np.testing.assert_array_equal(y, [1, 0, 0])


def test_numeric_control_columns(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"text": "a", "s": 0.25, "t": "2"}\n\n{"text": "b", "s": -3, "t": 1e-3}\n')
    texts, controls, class_ids = read_examples(DataConfig(path, text_column="text", control_columns=["s", "t"]))
    assert list(texts) == ["a", "b"]
    np.testing.assert_array_equal(controls, np.array([[0.25, 2.0], [-3.0, 0.001]], dtype=np.float32))
    np.testing.assert_array_equal(class_ids, [-1, -1])


def test_jsonl_prompt_response_causal_lm(tmp_path, gpt2_preprocessor):
    rows = [{"prompt": "ab", "response": " ab?", "mood": "great"}, {"prompt": "c", "response": " c", "mood": "other"}]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(path, prompt_column="prompt", response_column="response", label_column="mood",
                        control_map=CONTROLS)
    ((x, y, sample_weight),) = batches(make_dataset(config, gpt2_preprocessor))
    assert sorted(x) == ["control", "padding_mask", "token_ids"]
    # "ab ab?" -> ab, Ġab, ?; "c c" -> c, Ġc; framed by <|endoftext|> (0), padded with 0.
    np.testing.assert_array_equal(x["token_ids"], [[0, 5, 6, 7, 0, 0], [0, 3, 8, 0, 0, 0]])
    np.testing.assert_array_equal(y, [[5, 6, 7, 0, 0, 0], [3, 8, 0, 0, 0, 0]])
    # The loss counts the response and the end token only (completion_only, tests/data/test_completion_only.py).
    np.testing.assert_array_equal(sample_weight, [[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(x["control"], [[1.0], [-1.0]])
    ((_, _, whole_text),) = batches(make_dataset(dataclasses.replace(config, completion_only=False), gpt2_preprocessor))
    np.testing.assert_array_equal(whole_text, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_shuffle_keeps_controls_with_their_examples(tmp_path, bert_preprocessor):
    words = ["the", "food", "is", "great", "bad", "really", "tea", "awful"] * 3
    lines = [f"{w},{'great' if i % 3 == 0 else 'other'}" for i, w in enumerate(words)]
    path = write(tmp_path / "r.csv", "text,label\n" + "\n".join(lines) + "\n")
    config = DataConfig(path, text_column="text", label_column="label", control_map=CONTROLS,
                        batch_size=5, shuffle_seed=3)
    ds = make_dataset(config, bert_preprocessor)
    epochs = []
    for _ in range(2):
        rows = [(int(t[1]), float(c[0]), int(label)) for x, ys in ds
                for t, c, label in zip(x["token_ids"].numpy(), x["control"].numpy(), ys.numpy())]
        assert all(control == (1.0 if label == 0 else -1.0) for _, control, label in rows)
        assert sorted(rows) == sorted((BERT_VOCAB.index(w), 1.0 if i % 3 == 0 else -1.0, 0 if i % 3 == 0 else 1)
                                      for i, w in enumerate(words))
        epochs.append([r[0] for r in rows])
    file_order = [BERT_VOCAB.index(w) for w in words]
    assert epochs[0] != file_order and epochs[1] != epochs[0]  # reshuffled each epoch, from seed 3
    again = [int(t[1]) for x, _ in make_dataset(config, bert_preprocessor) for t in x["token_ids"].numpy()]
    assert again == epochs[0]
    kept = make_dataset(dataclasses.replace(config, reshuffle=False), bert_preprocessor)
    orders = [[int(t[1]) for x, _ in kept for t in x["token_ids"].numpy()] for _ in range(2)]
    assert orders[0] == orders[1] and orders[0] != file_order  # shuffled once, the same order every epoch


def test_tfds_fine_foods_by_name(built, kbi_cache, monkeypatch, bert_preprocessor):
    monkeypatch.setenv("KBI_CACHE", str(kbi_cache))
    config = DataConfig("small_fine_foods", text_column="review", label_column="label", control_map=CONTROLS,
                        batch_size=256)
    texts, controls, class_ids = read_examples(config, split="test")
    assert texts[0].startswith("These are the best tasting gummy fruits")
    assert np.bincount(class_ids).tolist() == [658, 342]
    np.testing.assert_array_equal(controls[:, 0], np.where(class_ids == 0, 1.0, -1.0))
    got = batches(make_dataset(config, bert_preprocessor, split="test"))
    assert [len(y) for _, y in got] == [256, 256, 256, 232]
    assert float(sum(x["control"].sum() for x, _ in got)) == 658 - 342


def test_tfds_jane_austen_causal_lm(built, kbi_cache, monkeypatch, gpt2_preprocessor):
    monkeypatch.setenv("KBI_CACHE", str(kbi_cache))
    titles = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
    config = DataConfig("jane_austen", text_column="text", label_column="book",
                        control_map={t: np.eye(6)[i].tolist() for i, t in enumerate(titles)}, batch_size=64)
    x, y, sample_weight = next(iter(make_dataset(config, gpt2_preprocessor, split="test[:100]")))
    assert x["token_ids"].shape == (64, 6) and y.shape == (64, 6) and sample_weight.shape == (64, 6)
    np.testing.assert_array_equal(x["control"].numpy(), np.tile(np.eye(6)[0], (64, 1)))


@pytest.mark.parametrize("name, text, message", [
    ("r.csv", "text,labl\na,great\n",
     r"File '.*r.csv' has no column 'label' \(label_column\). Columns present: \['text', 'labl'\]. Set label_column"),
    ("r.csv", "", r"File '.*r.csv' is empty"),
    ("r.csv", "text,label\n\n", r"File '.*r.csv' has no rows"),
    ("r.jsonl", "\n\n", r"File '.*r.jsonl' has no rows"),
    ("r.csv", 'text,label\na,great\n"multi\nline",other\nb,meh\n',
     r"r.csv' line 5: label 'meh' \(column 'label'\) is not in control_map. Known labels: \['great', 'other'\]"),
    ("r.csv", 'text,label\n"multi\nline",great\na,great,extra\n',
     r"r.csv' line 4: 3 fields, but the header has 2 \(\['text', 'label'\]\)"),
    ("r.csv", 'text,label\na,great\nb\n', r"r.csv' line 3: 1 fields, but the header has 2"),
    ("r.jsonl", '{"text": "a", "label": "great"}\n\n{"text": "b", "label": other}\n',
     r"r.jsonl' line 3: invalid JSON \(Expecting value"),
    ("r.jsonl", '{"text": "a", "label": "great"}\n["b", "other"]\n', r"r.jsonl' line 2: expected a JSON object per line, got list"),
    ("r.jsonl", '{"text": "a", "label": "great"}\n{"text": "b"}\n',
     r"r.jsonl' line 2: no value for column 'label'. Keys present: \['text'\]"),
    ("r.jsonl", '{"text": 5, "label": "great"}\n', r"r.jsonl' line 1: column 'text' must be a string, got 5"),
    ("r.jsonl", '{"text": "a", "label": null}\n', r"r.jsonl' line 1: column 'label' must be a string or integer label, got None"),
])
def test_bad_files_name_the_line_and_column(tmp_path, name, text, message):
    config = DataConfig(write(tmp_path / name, text), text_column="text", label_column="label", control_map=CONTROLS)
    with pytest.raises(ValueError, match=message):
        read_examples(config)


def test_bad_numeric_control(tmp_path):
    path = write(tmp_path / "r.csv", "text,x\na,1\nb,abc\n")
    with pytest.raises(ValueError, match=r"r.csv' line 3: control column 'x' must be a number, got 'abc'"):
        read_examples(DataConfig(path, text_column="text", control_columns=["x"]))
    path = write(tmp_path / "r.jsonl", '{"text": "a", "x": true}\n')
    with pytest.raises(ValueError, match=r"r.jsonl' line 1: control column 'x' must be a number, got True"):
        read_examples(DataConfig(path, text_column="text", control_columns=["x"]))


def test_bad_sources(tmp_path, bert_preprocessor):
    csv_path = write(tmp_path / "r.csv", REVIEWS_CSV)
    config = DataConfig(csv_path, text_column="text", label_column="label", control_map=CONTROLS)
    with pytest.raises(ValueError, match=r"split='test' was given, but source '.*r.csv' is a file and has no splits"):
        make_dataset(config, bert_preprocessor, split="test")
    with pytest.raises(FileNotFoundError, match=r"source '.*missing.csv': no such file"):
        read_examples(DataConfig(str(tmp_path / "missing.csv"), text_column="text", control_columns=["x"]))
    with pytest.raises(ValueError, match=r"source '.*r.txt': only \['.csv', '.jsonl'\] files are read"):
        read_examples(DataConfig(write(tmp_path / "r.txt", "a"), text_column="text", control_columns=["x"]))
    with pytest.raises(ValueError, match=r"source 'no_such_data_kbi' is neither a .csv/.jsonl file nor a TFDS data set name"):
        read_examples(DataConfig("no_such_data_kbi", text_column="text", control_columns=["x"]))


def test_preprocessor_must_match_the_columns(tmp_path, bert_preprocessor):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "response": "b", "label": "great"}\n')
    config = DataConfig(path, prompt_column="prompt", response_column="response", label_column="label",
                        control_map=CONTROLS)
    with pytest.raises(ValueError, match=r"TextClassifierPreprocessor needs `text_column` and `label_column`"):
        make_dataset(config, bert_preprocessor)
    with pytest.raises(TypeError, match=r"must be a keras_hub.models.TextClassifierPreprocessor or CausalLMPreprocessor .* Got BertTokenizer"):
        make_dataset(config, bert_preprocessor.tokenizer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_column="t", prompt_column="p", response_column="r", control_columns=["x"]), r"set either `text_column`, or both"),
    (dict(prompt_column="p", control_columns=["x"]), r"set either `text_column`, or both .* response_column=None"),
    (dict(text_column="t"), r"set exactly one of `control_map`"),
    (dict(text_column="t", control_columns=["x"], control_map=CONTROLS, label_column="l"), r"set exactly one of `control_map`"),
    (dict(text_column="t", control_map=CONTROLS), r"`control_map` looks up each example's label: set `label_column`"),
    (dict(text_column="t", label_column="l", control_map={"a": 1.0, "b": [1.0, 2.0]}),
     r"all controls in `control_map` must have the same length. Got lengths \{'a': 1, 'b': 2\}"),
    (dict(text_column="t", label_column="l", control_map={"a": "high"}), r"control_map\['a'\] must be a finite number"),
    (dict(text_column="t", label_column="l", control_map={"a": float("nan")}), r"control_map\['a'\] must be a finite number"),
    (dict(text_column="t", label_column="l", control_columns=["x"]), r"label_column='l' needs the class id order: set `label_names`"),
    (dict(text_column="t", label_column="l", control_map=CONTROLS, label_names=["great", "bad"]),
     r"`label_names` \['great', 'bad'\] and the keys of `control_map` \['great', 'other'\] must be the same labels"),
    (dict(text_column="t", control_columns="x"), r"`control_columns` must be a non-empty list of column names. Got control_columns='x'"),
    (dict(text_column="t", control_columns=["x"], batch_size=0), r"`batch_size` must be a positive integer. Got batch_size=0"),
    (dict(text_column="t", control_columns=["x"], shuffle_seed=1.5), r"`shuffle_seed` must be an integer or None"),
    (dict(text_column="t", control_columns=["x"], reshuffle="no"), r"`reshuffle` must be true or false. Got reshuffle=.no."),
])
def test_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig("r.csv", **kwargs)


def test_config_round_trip():
    config = DataConfig("r.csv", text_column="t", label_column="l", control_map={"a": [1, 0], 2: [0, 1]}, batch_size=4)
    assert config.control_map == {"a": [1.0, 0.0], "2": [0.0, 1.0]}
    assert (config.control_dim, config.class_names) == (2, ["a", "2"])
    assert DataConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["r.csv", "r.jsonl"])
def test_a_non_utf8_file_names_the_file_and_the_line(tmp_path, name):
    rows = [b"text,label", b"a,great", b"caf\xe9,other"] if name == "r.csv" else [
        b'{"text": "a", "label": "great"}', b'{"text": "caf\xe9", "label": "other"}']
    path = tmp_path / name
    path.write_bytes(b"\n".join(rows) + b"\n")
    config = DataConfig(str(path), text_column="text", label_column="label", control_map=CONTROLS)
    line = len(rows)
    with pytest.raises(ValueError, match=rf"File '.*{name}' line {line}: not UTF-8 \(byte b'\\xe9' at column \d+\)\. "
                                         "Save the file as UTF-8"):
        read_examples(config)


@pytest.mark.parametrize("value", [float("nan"), 10**400, [1.0, True]])
def test_control_map_values_must_be_finite_numbers(tmp_path, value):
    with pytest.raises(ValueError, match=r"control_map\['great'\] must be a finite number or a list of them"):
        DataConfig(tmp_path / "r.csv", text_column="text", label_column="label", control_map={"great": value, "other": 0.0})
