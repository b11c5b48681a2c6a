"""A `tf.data` pipeline from user data to what a KerasHub task's `fit` takes, plus a `control` input.

The source is a CSV or JSONL file, or a TFDS data set (this package's `small_fine_foods` and
`jane_austen` included). It is read whole and checked in Python when the pipeline is made, so a bad
row fails now, with its line number, not in the middle of training. Each example gets a control
vector, from its label (`control_map`) or from numeric columns (`control_columns`).

Elements, batched, as `fit` expects them for the preprocessor passed in:
- `TextClassifierPreprocessor`: `(x, class_id)`; x holds the token inputs and `"control"`.
- `CausalLMPreprocessor`: `(x, next_token_ids, sample_weight)`; x holds the token inputs and
  `"control"`; the sample weight is the padding mask of the targets. With prompt/response columns
  the text is the preprocessor's chat template with the prompt as the user turn and the response as
  the assistant turn, or `prompt + response` joined as is without one (`chat_template`); and the
  loss counts the response only (`completion_only`, data/completion.py): weight 1 on the targets
  that predict response tokens and the end token, 0 on the prompt and the padding.

`x["control"]` is float32 `[batch, control_dim]`; class ids are int32 `[batch]`.

    config = DataConfig("reviews.csv", text_column="review", label_column="score",
                        control_map={"great": 1.0, "other": -1.0}, batch_size=16, shuffle_seed=0)
    ds = make_dataset(config, classifier.preprocessor)  # classifier.fit(ds, epochs=2)

    config = DataConfig("chats.jsonl", prompt_column="question", response_column="answer",
                        control_columns=["formality"])  # completion_only=True: loss on the answers
    ds = make_dataset(config, lm.preprocessor)  # lm.fit(ds); x, y, sample_weight per batch
"""

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import keras_hub
import tensorflow as tf

from keras_biasinject.data.completion import completion_weights, model_texts, pack, tokenized_pairs
from keras_biasinject.layers.checks import check_positive_int, is_finite_number

FILE_SUFFIXES = (".csv", ".jsonl")
Control = Union[float, Sequence[float]]


@dataclasses.dataclass
class DataConfig:
    """Where the examples come from and how each gets its text, class id and control."""

    source: str  # a .csv or .jsonl file, or a TFDS name ("small_fine_foods", "jane_austen", "imdb_reviews")
    text_column: Optional[str] = None  # the text to tokenize; or use prompt_column + response_column
    prompt_column: Optional[str] = None  # causal LM: the user turn; the text is prompt + response (chat_template)
    response_column: Optional[str] = None  # causal LM: the part after the prompt
    label_column: Optional[str] = None  # the class label: the classifier's target and control_map's key
    label_names: Optional[Sequence[str]] = None  # class id order; None: the order of control_map's keys
    control_map: Optional[Mapping[str, Control]] = None  # label -> control (a number, or control_dim numbers)
    control_columns: Optional[Sequence[str]] = None  # numeric columns that form the control instead
    batch_size: int = 8  # examples per batch; the last batch may be smaller
    shuffle_seed: Optional[int] = None  # None: keep the source's order; an int: shuffle from it
    reshuffle: bool = True  # with shuffle_seed: a new order each epoch; False: one order, kept every epoch
    completion_only: bool = True  # prompt/response: loss on the response + end token only; False: whole text
    chat_template: Union[bool, str] = True  # True: the preprocessor's template, if any; False: joined as is; or Jinja

    def __post_init__(self):
        if not isinstance(self.source, (str, Path)) or not str(self.source):
            raise ValueError(f"DataConfig: `source` must be a file path or a TFDS name. Got source={self.source!r}.")
        self.source = str(self.source)
        has_pair = self.prompt_column is not None and self.response_column is not None
        half_pair = (self.prompt_column is None) != (self.response_column is None)
        if half_pair or (self.text_column is None) == (not has_pair):
            raise ValueError(
                "DataConfig: set either `text_column`, or both `prompt_column` and `response_column`. Got "
                f"text_column={self.text_column!r}, prompt_column={self.prompt_column!r}, "
                f"response_column={self.response_column!r}."
            )
        if (self.control_map is None) == (self.control_columns is None):
            raise ValueError(
                "DataConfig: set exactly one of `control_map` (label -> control) and `control_columns` "
                f"(numeric columns). Got control_map={self.control_map!r}, control_columns={self.control_columns!r}."
            )
        if self.control_map is not None:
            self.control_map = _check_control_map(self.control_map)
            if self.label_column is None:
                raise ValueError("DataConfig: `control_map` looks up each example's label: set `label_column`.")
        if self.control_columns is not None:
            if isinstance(self.control_columns, str) or not self.control_columns or not all(
                isinstance(c, str) and c for c in self.control_columns
            ):
                raise ValueError(
                    "DataConfig: `control_columns` must be a non-empty list of column names. "
                    f"Got control_columns={self.control_columns!r}."
                )
            self.control_columns = list(self.control_columns)
        if self.label_column is not None and self.control_map is None and self.label_names is None:
            raise ValueError(
                f"DataConfig: label_column={self.label_column!r} needs the class id order: set `label_names` "
                "(the control comes from control_columns, so control_map cannot give it)."
            )
        if self.label_names is not None:
            if isinstance(self.label_names, str) or len(set(map(str, self.label_names))) != len(self.label_names):
                raise ValueError(f"DataConfig: `label_names` must be a list of distinct labels. Got {self.label_names!r}.")
            self.label_names = [str(n) for n in self.label_names]
            if self.control_map is not None and set(self.label_names) != set(self.control_map):
                raise ValueError(
                    f"DataConfig: `label_names` {self.label_names} and the keys of `control_map` "
                    f"{list(self.control_map)} must be the same labels."
                )
        check_positive_int(self.batch_size, "batch_size", "DataConfig")
        if self.shuffle_seed is not None and (isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int)):
            raise ValueError(f"DataConfig: `shuffle_seed` must be an integer or None. Got shuffle_seed={self.shuffle_seed!r}.")
        if not isinstance(self.reshuffle, bool):
            raise ValueError(f"DataConfig: `reshuffle` must be true or false. Got reshuffle={self.reshuffle!r}.")
        if not isinstance(self.completion_only, bool):
            raise ValueError(
                f"DataConfig: `completion_only` must be true or false. Got completion_only={self.completion_only!r}."
            )
        if not isinstance(self.chat_template, (bool, str)) or self.chat_template == "":
            raise ValueError(
                "DataConfig: `chat_template` must be true (the preprocessor's own), false (join prompt and response "
                f"as they are) or a Jinja template string. Got chat_template={self.chat_template!r}."
            )

    @property
    def control_dim(self):
        """Width of the control vector."""
        if self.control_columns is not None:
            return len(self.control_columns)
        return len(next(iter(self.control_map.values())))

    @property
    def class_names(self):
        """Labels in class id order (None without a label column)."""
        if self.label_column is None:
            return None
        return self.label_names if self.label_names is not None else list(self.control_map)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config):
        return cls(**config)


def make_dataset(config, preprocessor, split=None):
    """A batched `tf.data.Dataset` for `preprocessor`'s task, each `x` carrying `"control"`.

    Args:
        config: a `DataConfig`.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor` or `CausalLMPreprocessor`.
        split: the TFDS split ("train", "test", "train[:10%]"); None means "train". Files have none.

    With prompt/response columns and `completion_only`, a prompt that leaves no room for its response
    in the preprocessor's sequence_length raises ValueError naming the example; a response cut at
    the sequence length is trained up to the cut, without its end token, with a warning naming it.
    """
    if isinstance(preprocessor, keras_hub.models.TextClassifierPreprocessor):
        causal = False
        if config.label_column is None or config.text_column is None:
            raise ValueError(
                "make_dataset: a TextClassifierPreprocessor needs `text_column` and `label_column` (prompt/"
                f"response pairs are for causal LMs). Got text_column={config.text_column!r}, "
                f"label_column={config.label_column!r}."
            )
    elif isinstance(preprocessor, keras_hub.models.CausalLMPreprocessor):
        causal = True  # the target is the next token; class ids, if any, are not used
    else:
        raise TypeError(
            "make_dataset: `preprocessor` must be a keras_hub.models.TextClassifierPreprocessor or "
            f"CausalLMPreprocessor (e.g. `task.preprocessor`). Got {type(preprocessor).__name__}."
        )

    texts, controls, class_ids, pairs, places = _read(config, split)
    pairs = pairs if causal else None
    spans = None
    if pairs is not None:  # tokenized now, in Python, and packed in the map (data/completion.py says why)
        prompt_texts, full_texts = model_texts(preprocessor, *pairs, chat_template=config.chat_template)
        texts, spans = tokenized_pairs(preprocessor, prompt_texts, full_texts, places, config.completion_only)
    slices = (texts, controls, class_ids) if spans is None else (texts, controls, class_ids, spans)
    ds = tf.data.Dataset.from_tensor_slices(slices)
    if config.shuffle_seed is not None:
        ds = ds.shuffle(len(controls), seed=config.shuffle_seed, reshuffle_each_iteration=config.reshuffle)
    ds = ds.ragged_batch(config.batch_size) if pairs is not None else ds.batch(config.batch_size)

    def classify(text, control, class_id):
        x, y = preprocessor(text, class_id)
        return {**x, "control": control}, y

    def continue_text(text, control, class_id):
        del class_id
        x, y, sample_weight = preprocessor(text)
        return {**x, "control": control}, y, sample_weight

    def continue_prompt(ids, control, class_id, span=None):
        del class_id
        x, y, sample_weight = pack(preprocessor, ids)
        if span is not None:
            sample_weight = completion_weights(sample_weight, span)
        return {**x, "control": control}, y, sample_weight

    step = classify if not causal else continue_text if pairs is None else continue_prompt
    ds = ds.map(step, num_parallel_calls=tf.data.AUTOTUNE)
    # Autotuning off (AUTOTUNE then means a fixed default: parallel calls up to the cores, a small prefetch buffer).
    # Its optimisation thread sleeps between rounds, and deleting an iterator waits until it wakes: `fit` stalled
    # up to 29 s at the second epoch's start and again before returning, in about half the runs on 2 cores
    # (py-spy: `RootDataset::Iterator::~Iterator` waiting on its thread). Tokenizing a batch costs milliseconds
    # against a training step of hundreds, so tuning the pipeline gains nothing here.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def read_examples(config, split=None):
    """(texts, controls, class_ids) as numpy arrays: str `[n]`, float32 `[n, control_dim]`, int32 `[n]`.

    Class ids are -1 without a label column. With prompt/response columns the text is `prompt +
    response`, joined as is. Raises ValueError naming the file, line and column of the first bad row.
    """
    return _read(config, split)[:3]


def _read(config, split):
    """`read_examples`' arrays, then ([prompts], [responses]) or None, and each example's place."""
    rows, columns, where, unit = _read_source(config.source, split)
    wanted = {
        "text_column": config.text_column,
        "prompt_column": config.prompt_column,
        "response_column": config.response_column,
        "label_column": config.label_column,
        **{f"control_columns[{i}]": c for i, c in enumerate(config.control_columns or [])},
    }
    wanted = {field: column for field, column in wanted.items() if column is not None}
    for field, column in wanted.items():
        if column not in columns:
            raise ValueError(
                f"{where} has no column {column!r} ({field}). Columns present: {columns}. "
                f"Set {field} to one of them."
            )
    class_index = {name: i for i, name in enumerate(config.class_names or [])}
    texts, controls, class_ids, prompts, responses, places = [], [], [], [], [], []
    for number, row in rows:
        at = f"{where} {unit} {number}"
        places.append(at)
        for column in wanted.values():
            if column not in row:
                raise ValueError(f"{at}: no value for column {column!r}. Keys present: {sorted(row)}.")
        if config.text_column is not None:
            texts.append(_text(row, config.text_column, at))
        else:
            prompts.append(_text(row, config.prompt_column, at))
            responses.append(_text(row, config.response_column, at))
            texts.append(prompts[-1] + responses[-1])
        label = None
        if config.label_column is not None:
            label = _label(row[config.label_column], config.label_column, at)
            if label not in class_index:
                raise ValueError(
                    f"{at}: label {label!r} (column {config.label_column!r}) is not in "
                    f"{'label_names' if config.label_names is not None else 'control_map'}. "
                    f"Known labels: {config.class_names}."
                )
        class_ids.append(class_index.get(label, -1))
        if config.control_map is not None:
            controls.append(config.control_map[label])
        else:
            controls.append([_number(row[c], c, at) for c in config.control_columns])
    return (
        np.asarray(texts, dtype=object),
        np.asarray(controls, dtype="float32").reshape(len(texts), config.control_dim),
        np.asarray(class_ids, dtype="int32"),
        (prompts, responses) if config.text_column is None else None,
        places,
    )


def _read_source(source, split):
    """([(line number, row dict)], column names, description) from a file or a TFDS split."""
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES:
        if split is not None:
            raise ValueError(
                f"split={split!r} was given, but source {source!r} is a file and has no splits. "
                "Pass one file per split and split=None."
            )
        if not path.is_file():
            raise FileNotFoundError(f"DataConfig source {source!r}: no such file.")
        read = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
        rows, columns = read(path)
        if not rows:
            raise ValueError(f"File {str(path)!r} has no rows. Give a file with a header (CSV) and at least one example.")
        return rows, columns, f"File {str(path)!r}", "line"
    if path.exists():
        raise ValueError(
            f"DataConfig source {source!r}: only {list(FILE_SUFFIXES)} files are read. "
            "Convert it to CSV or JSONL, or pass a TFDS data set name."
        )
    return _read_tfds(source, split or "train")


def _text_of(path):
    """The file's text (UTF-8, with or without a BOM), or ValueError naming the line of the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"File {str(path)!r} line {line}: not UTF-8 (byte {data[e.start:e.start + 1]!r} at column {column}). "
            "Save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 old.csv > new.csv`."
        ) from None


def _read_csv(path):
    with io.StringIO(_text_of(path), newline="") as f:
        reader = csv.reader(f)
        header, rows = None, []
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(f"File {str(path)!r} line {start}: malformed CSV ({e}).") from None
            if not fields:
                continue  # blank line
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                raise ValueError(
                    f"File {str(path)!r} line {start}: {len(fields)} fields, but the header has "
                    f"{len(header)} ({header}). Quote fields that contain commas."
                )
            rows.append((start, dict(zip(header, fields))))
    if header is None:
        raise ValueError(f"File {str(path)!r} is empty. A CSV file needs a header row and at least one example.")
    return rows, header


def _read_jsonl(path):
    rows, columns = [], None
    with io.StringIO(_text_of(path)) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"File {str(path)!r} line {line_number}: invalid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"File {str(path)!r} line {line_number}: expected a JSON object per line, got "
                    f"{type(row).__name__} {line.strip()[:60]!r}."
                )
            columns = columns or list(row)
            rows.append((line_number, row))
    return rows, columns or []


def _read_tfds(name, split):
    # Lazy: tensorflow_datasets takes seconds to import, and files (CSV, JSONL) never need it.
    import tensorflow_datasets as tfds

    from keras_biasinject.data.builders import BUILDERS, prepared_builder  # imports tensorflow_datasets too

    if name in BUILDERS:
        builder = prepared_builder(name)
    else:
        try:
            builder = tfds.builder(name)
        except Exception as e:  # TFDS raises its own DatasetNotFoundError
            raise ValueError(
                f"DataConfig source {name!r} is neither a .csv/.jsonl file nor a TFDS data set name "
                f"({str(e).splitlines()[0]}). Check the path or the name (`tfds.list_builders()`)."
            ) from None
        builder.download_and_prepare()
    if "+" not in split and split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"TFDS data set {name!r} has no split {split!r}. Splits: {sorted(builder.info.splits)}.")
    features = builder.info.features
    if not isinstance(features, tfds.features.FeaturesDict):
        raise ValueError(f"TFDS data set {name!r} yields {type(features).__name__}, not a dict of features.")
    columns = list(features.keys())
    decoders = {c: _tfds_decoder(features[c]) for c in columns}
    ds = builder.as_dataset(split=split)
    rows = [(i, {c: decoders[c](v) for c, v in example.items()}) for i, example in enumerate(tfds.as_numpy(ds))]
    if not rows:
        raise ValueError(f"TFDS data set {name!r} split {split!r} has no examples.")
    return rows, columns, f"TFDS data set {name!r} split {split!r}", "example"


def _tfds_decoder(feature):
    import tensorflow_datasets as tfds  # lazy, as in _read_tfds

    if isinstance(feature, tfds.features.ClassLabel) and feature.names:
        return lambda v: feature.int2str(int(v))
    return lambda v: v.decode("utf-8") if isinstance(v, bytes) else v


def _text(row, column, at):
    value = row[column]
    if not isinstance(value, str):
        raise ValueError(f"{at}: column {column!r} must be a string, got {value!r}.")
    return value


def _label(value, column, at):
    if value is None or isinstance(value, (dict, list, float)):
        raise ValueError(f"{at}: column {column!r} must be a string or integer label, got {value!r}.")
    return str(value)


def _number(value, column, at):
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise ValueError(f"{at}: control column {column!r} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{at}: control column {column!r} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{at}: control column {column!r} must be finite, got {value!r}.")
    return number


def _check_control_map(control_map):
    if not isinstance(control_map, Mapping) or not control_map:
        raise ValueError(
            "DataConfig: `control_map` must be a non-empty dict label -> control, e.g. "
            f"{{'great': 1.0, 'other': -1.0}}. Got control_map={control_map!r}."
        )
    vectors = {}
    for label, value in control_map.items():
        vector = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if (
            not isinstance(vector, (list, tuple))
            or not vector
            or not all(is_finite_number(v) for v in vector)
        ):
            raise ValueError(
                f"DataConfig: control_map[{label!r}] must be a finite number or a list of them. Got {value!r}."
            )
        vectors[str(label)] = [float(v) for v in vector]
    widths = {label: len(v) for label, v in vectors.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"DataConfig: all controls in `control_map` must have the same length. Got lengths {widths}.")
    return vectors
