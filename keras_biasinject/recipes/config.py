"""Recipe configs: what to fine-tune, on what, how, and against which control groups.

A recipe is a TOML (or YAML) file with four tables, each a small dataclass below:

    task = "classification"          # or "causal_lm"
    [model]   spec, sequence_length, num_classes, dropout, pooling ("auto": the checkpoint's own), quantize ("int8")
    [data]    path or TFDS name, columns, control mapping       -> keras_biasinject.data.DataConfig
    [inject]  targets, rank, gate, ...                          -> keras_biasinject.InjectionConfig
    [train]   epochs, batch size, learning rate, methods, class_weight ("balanced" or {label: weight}), ...
    [feedback] the feedback head (method "feedback_head", causal_lm): pooling, activation, ...

Unknown keys and bad values raise `ValueError` naming the table, the key and what is allowed; so do NaN
and inf anywhere (`learning_rate = inf`, `--set train.learning_rate=1e999`), integers beyond the float
range anywhere (`alpha = 10**400`), bools or floats where a count belongs, and counts beyond int32. Numpy integers pass wherever Python integers do.
"""

import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import yaml

from keras_biasinject.layers.checks import check_positive_int, check_positive_number, describe, is_finite_number
from keras_biasinject.rewrite.config import InjectionConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TASKS = ("classification", "causal_lm")
# Control groups and our method. "base": the frozen base (plus, for classification, a head fitted as a
# linear probe on its features to convergence, L2 chosen on validation; zero-shot for the LM); "keras_lora": KerasHub's `enable_lora` at the same rank and targets;
# "full": every weight trains (slow, opt-in); "bias_injection": this package; "feedback_head": after
# bias_injection, a feedback head on its model (adapters frozen) that learns to read the label.
METHODS = ("base", "keras_lora", "full", "bias_injection", "feedback_head")


@dataclasses.dataclass
class ModelConfig:
    spec: str = "minilm-l6"  # built-in name, KerasHub preset, Hugging Face folder or .gguf file
    sequence_length: int = 128  # tokens per example, after truncation and padding
    num_classes: Optional[int] = None  # classification only; None: the number of labels in the data
    dropout: Optional[float] = None  # None: the checkpoint's rate; else the backbone's (and classifier head's)
    pooling: str = "auto"  # classification: "auto" (the checkpoint's own: mean for sentence-transformers), "cls", "mean"
    quantize: Optional[str] = None  # "int8": the frozen backbone in Keras' int8 (adapters, head, an LM's token embedding: float32)


@dataclasses.dataclass
class TrainConfig:
    methods: Sequence[str] = ("base", "keras_lora", "bias_injection")  # what to train and compare, in order
    epochs: int = 2  # passes over the training examples
    batch_size: int = 16  # examples per step
    learning_rate: float = 1e-3  # peak, after warm-up; cosine decay to 10% over the run
    full_learning_rate: float = 5e-5  # the same schedule's peak for method "full" (all weights move)
    max_train_examples: Optional[int] = None  # None: all; else the first N after a seeded shuffle
    max_eval_examples: Optional[int] = None  # None: the whole evaluation split
    patience: int = 2  # early stopping on validation loss, in epochs
    seed: int = 0  # data order, initial adapter weights and validation split
    save_freq: Union[str, int] = "epoch"  # backups: "epoch"; or every N steps, resumed at that exact step
    class_weight: Union[None, str, dict] = None  # classification: "balanced", or {label: weight} (others 1.0); None: all 1


@dataclasses.dataclass
class SteerConfig:
    judge: Optional[str] = None  # run folder of the classification recipe (holds classifier.keras); None: no curve
    controls: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0)  # control values to generate at (as the model gets them)
    samples: int = 16  # prompts per control value
    prompt_words: int = 4  # each prompt: the first words of a held-out review
    max_length: int = 40  # tokens per generation, prompt included
    positive_label: int = 0  # the judge's class id for "positive" (Fine Foods: 0 = great)


@dataclasses.dataclass
class FeedbackConfig:
    """The feedback head that method "feedback_head" trains: it learns to read, from the text alone, the
    label each example's control stands for (sigmoid: P(control > neutral)), while the control it runs
    under is drawn at random, so that it reads the text and not the control."""

    pooling: str = "last"  # the reading of a text: at its last token ("last"), or the mean over tokens ("mean")
    activation: str = "sigmoid"  # "sigmoid": P(positive), binary cross-entropy; "tanh"/"linear": the control value, MSE
    control_jitter: float = 1.0  # while the head trains, each example's control is uniform in neutral +- this
    epochs: int = 1  # passes over the training examples (the batch size and limits are [train]'s)
    learning_rate: float = 1e-3  # peak of the same schedule as [train]'s


POOLING_CHOICES = ("auto", "cls", "mean")  # [model] pooling
QUANTIZE_MODES = ("int8",)  # [model] quantize: Keras' `quantize` modes that train adapters on a frozen base
MAX_COUNT = 2**31 - 1  # the largest count (epochs, steps, examples, tokens) a recipe takes: TensorFlow's int32


def _count(value, name, owner, allow_none=False):
    """`check_positive_int`, also refusing counts beyond MAX_COUNT (numpy integers pass, as ints)."""
    value = check_positive_int(value, name, owner, allow_none=allow_none)
    if value is not None and value > MAX_COUNT:
        raise ValueError(f"{owner}: `{name}` must be at most {MAX_COUNT:,}. Got {name}={str(value)[:20]}... "
                         f"({len(str(value)):,} digits).")
    return value


def _check_finite(value, key):
    """Raises ValueError naming the first NaN or inf anywhere in `value` (a table, list or dataclass)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")
    elif isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise ValueError(f"recipe: `{key}` = {value!r} is not a finite number. NaN and inf are refused everywhere in "
                         "a recipe (they make every weight NaN): give a finite value.")
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and not is_finite_number(value):
        raise ValueError(f"recipe: `{key}` = {describe(value)} is out of range: a number in a recipe must fit a float "
                         f"(at most 1.8e308), a count at most {MAX_COUNT:,}. Give a smaller value.")


def _build(cls, table, values):
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"recipe: [{table}] must be a table of keys. Got {values!r}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in [{table}]. Allowed keys: {sorted(fields)}.")
    return cls(**values)


@dataclasses.dataclass
class Recipe:
    """A whole recipe. Build one from a file with `load_recipe`, or in code."""

    task: str = "classification"  # "classification" or "causal_lm"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: dict = dataclasses.field(default_factory=dict)  # keyword arguments of keras_biasinject.data.DataConfig
    inject: InjectionConfig = dataclasses.field(default_factory=InjectionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    steer: SteerConfig = dataclasses.field(default_factory=SteerConfig)  # causal_lm: the steering curve
    feedback: Optional[FeedbackConfig] = None  # the head method "feedback_head" trains; None: no head
    name: str = "recipe"  # used in report titles

    def __post_init__(self):
        for table in ("model", "data", "inject", "train", "steer", "feedback"):
            _check_finite(getattr(self, table), table)
        if self.task not in TASKS:
            raise ValueError(f"recipe: task must be one of {list(TASKS)}. Got task={self.task!r}.")
        self.model = _build(ModelConfig, "model", self.model)
        self.train = _build(TrainConfig, "train", self.train)
        if isinstance(self.inject, dict):
            try:
                self.inject = InjectionConfig.from_dict(self.inject)
            except (TypeError, ValueError) as error:
                raise ValueError(f"recipe: [inject] {error}") from None
        self.steer = _build(SteerConfig, "steer", self.steer or None)
        if self.task != "causal_lm" and self.steer.judge is not None:
            raise ValueError("recipe: [steer] is for task='causal_lm' (it judges generated text); remove it.")
        if not isinstance(self.data, dict):
            raise ValueError(f"recipe: [data] must be a table of keys. Got {self.data!r}.")
        methods = list(self.train.methods)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods or len(set(methods)) != len(methods):
            raise ValueError(
                f"recipe: [train] methods must be distinct names from {list(METHODS)}. Got methods={methods!r}."
            )
        self.train.methods = methods
        if "keras_lora" in methods and (self.inject.blocks is not None or self.inject.exclude is not None):
            raise ValueError(
                "recipe: method 'keras_lora' (KerasHub's enable_lora) adapts every layer of a chosen name in every block, "
                f"so it cannot follow [inject] blocks={self.inject.blocks!r} or exclude={self.inject.exclude!r}: the comparison "
                "would be on other layers. Remove blocks/exclude, or drop 'keras_lora' from [train] methods."
            )
        self._check_feedback(methods)
        self._check_quantize(methods)
        self._check_numbers()
        self._check_steer()
        self._check_classification()

    def _check_quantize(self, methods):
        """[model] quantize: None or "int8", and no method that trains the (then integer) base weights."""
        mode = self.model.quantize
        if mode is None:
            return
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"recipe: [model] quantize must be one of {list(QUANTIZE_MODES)} or left out. Got quantize={describe(mode)}.")
        if "full" in methods:
            raise ValueError(f"recipe: method 'full' trains every base weight, but [model] quantize={mode!r} makes them integers "
                             "that cannot train. Drop 'full' from [train] methods, or remove quantize.")

    def _check_classification(self):
        """[model] pooling and [train] class_weight: values, and only for task='classification'."""
        pooling = self.model.pooling
        if pooling not in POOLING_CHOICES:
            raise ValueError(f"recipe: [model] pooling must be one of {list(POOLING_CHOICES)}. Got pooling={describe(pooling)}.")
        if self.task != "classification" and pooling != "auto":
            raise ValueError(f"recipe: [model] pooling={pooling!r} is for task='classification' (how the classifier "
                             "reads a text); remove it for 'causal_lm'.")
        weight = self.train.class_weight
        if weight is None:
            return
        if self.task != "classification":
            raise ValueError(f"recipe: `train.class_weight` = {describe(weight)} weights the classes of a classifier; "
                             f"task={self.task!r} has none. Remove train.class_weight.")
        if isinstance(weight, str):
            if weight != "balanced":
                raise ValueError(f"recipe: `train.class_weight` = {weight!r} is not a known weighting. Use \"balanced\" "
                                 "(n_examples / (n_classes * count) per class), a mapping {label: weight}, or leave it out.")
            return
        if not isinstance(weight, dict) or not weight:
            raise ValueError(f"recipe: `train.class_weight` = {describe(weight)} must be \"balanced\" or a non-empty "
                             "mapping {label: weight}, e.g. {great = 1.0, other = 2.0}.")
        bad = {k: v for k, v in weight.items()
               if isinstance(v, bool) or not is_finite_number(v) or not isinstance(v, (int, float, np.number)) or v < 0}
        if bad:
            raise ValueError(f"recipe: `train.class_weight` = {describe(weight)}: the weight(s) {describe(bad)} are not "
                             "finite numbers >= 0. Give each label a finite weight >= 0 (1.0 is the unweighted loss).")
        if not any(v > 0 for v in weight.values()):
            raise ValueError(f"recipe: `train.class_weight` = {describe(weight)}: every weight is 0, so nothing would "
                             "train. Give at least one label a weight > 0.")
        labels = _class_names(self.data)
        unknown = [k for k in weight if str(k) not in labels] if labels is not None else []
        if unknown:
            raise ValueError(f"recipe: `train.class_weight` = {describe(weight)} names unknown label(s) {unknown}. "
                             f"The labels (from [data] label_names or control_map) are {labels}: use those.")
        self.train.class_weight = {str(k): float(v) for k, v in weight.items()}

    def _check_feedback(self, methods):
        from keras_biasinject.layers.feedback_head import ACTIVATIONS, POOLINGS

        if self.feedback is not None:
            self.feedback = _build(FeedbackConfig, "feedback", self.feedback)
        wants_head = "feedback_head" in methods
        if wants_head and (self.task != "causal_lm" or self.feedback is None):
            raise ValueError("recipe: method 'feedback_head' needs task='causal_lm' and a [feedback] table (pooling, "
                             "activation, ...): add one, or remove the method.")
        if wants_head and ("bias_injection" not in methods or methods.index("bias_injection") > methods.index("feedback_head")):
            raise ValueError(f"recipe: method 'feedback_head' reads the model 'bias_injection' trains: list that method "
                             f"before it. Got methods={methods!r}.")
        if self.feedback is None:
            return
        fb = self.feedback
        if fb.pooling not in ("last", "mean") or fb.activation not in ACTIVATIONS:
            raise ValueError(f"recipe: [feedback] pooling must be 'last' or 'mean' (of {list(POOLINGS)}) and activation one "
                             f"of {list(ACTIVATIONS)}. Got pooling={fb.pooling!r}, activation={fb.activation!r}.")
        fb.epochs = _count(fb.epochs, "epochs", "recipe: [feedback]")
        fb.learning_rate = check_positive_number(fb.learning_rate, "learning_rate", "recipe: [feedback]")
        j = fb.control_jitter
        if not is_finite_number(j) or j < 0:
            raise ValueError(f"recipe: [feedback] control_jitter must be a finite number >= 0. Got control_jitter={describe(j)}.")

    def _check_numbers(self):
        train, model = self.train, self.model
        for name in ("epochs", "batch_size", "patience"):  # numpy integers pass, stored as ints (report.json)
            setattr(train, name, _count(getattr(train, name), name, "recipe: [train]"))
        seed = train.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_COUNT:
            raise ValueError(f"recipe: [train]: `seed` must be an integer in [0, {MAX_COUNT}]. Got seed={str(seed)[:40]}.")
        train.seed = int(seed)
        if train.save_freq != "epoch":
            try:
                train.save_freq = _count(train.save_freq, "save_freq", "recipe: [train]")
            except ValueError:
                raise ValueError(f'recipe: [train]: `save_freq` must be "epoch" or a positive number of steps. '
                                 f"Got save_freq={train.save_freq!r}.") from None
        for name in ("max_train_examples", "max_eval_examples"):
            setattr(train, name, _count(getattr(train, name), name, "recipe: [train]", allow_none=True))
        for name in ("learning_rate", "full_learning_rate"):
            setattr(train, name, check_positive_number(getattr(train, name), name, "recipe: [train]"))
        model.sequence_length = _count(model.sequence_length, "sequence_length", "recipe: [model]")
        model.num_classes = _count(model.num_classes, "num_classes", "recipe: [model]", allow_none=True)
        d = model.dropout
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1):
            raise ValueError(f"recipe: [model] dropout must be a number in [0, 1), or left out. Got dropout={describe(d)}.")
        if self.task == "causal_lm" and self.model.num_classes is not None:
            raise ValueError("recipe: [model] num_classes is for task='classification'; remove it for 'causal_lm'.")

    def _check_steer(self):
        steer, owner = self.steer, "recipe: [steer]"
        for name in ("samples", "prompt_words", "max_length"):
            setattr(steer, name, _count(getattr(steer, name), name, owner))
        label = steer.positive_label
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"{owner}: `positive_label` must be an integer >= 0. Got positive_label={describe(label)}.")
        steer.positive_label = int(label)
        controls = steer.controls
        if not isinstance(controls, (list, tuple)) or not controls or not all(is_finite_number(c) for c in controls):
            raise ValueError(f"{owner}: `controls` must be a non-empty list of finite numbers. Got controls={describe(controls)}.")
        if steer.judge is not None and not isinstance(steer.judge, str):
            raise ValueError(f"{owner}: `judge` must be a run folder (a string) or left out. Got judge={steer.judge!r}.")

    def to_dict(self):
        return {
            "name": self.name,
            "task": self.task,
            "model": dataclasses.asdict(self.model),
            "data": dict(self.data),
            "inject": self.inject.to_dict(),
            "train": dataclasses.asdict(self.train),
            "steer": dataclasses.asdict(self.steer),
            "feedback": None if self.feedback is None else dataclasses.asdict(self.feedback),
        }


def _class_names(data):
    """The labels of a recipe's [data] table in class id order (as DataConfig.class_names), or None."""
    names = data.get("label_names") if isinstance(data, dict) else None
    if names is None and isinstance(data, dict) and isinstance(data.get("control_map"), dict):
        names = list(data["control_map"])
    return None if names is None else [str(n) for n in names]


def class_weights(recipe, train_labels):
    """{class id: weight} for `model.fit(class_weight=...)` from `[train] class_weight`, or None.

    `train_labels`: the class ids of the training examples. "balanced" gives class c the weight
    n / (n_classes * count_c) (scikit-learn's formula; n_classes from [model] num_classes or the data);
    a mapping gives each named label its weight and every other class 1.0."""
    weight = recipe.train.class_weight
    if weight is None:
        return None
    labels = np.asarray(train_labels).reshape(-1)
    names = _class_names(recipe.data) or []
    n_classes = recipe.model.num_classes or len(names) or int(labels.max()) + 1
    if weight == "balanced":
        counts = np.bincount(labels, minlength=n_classes)
        empty = [names[c] if c < len(names) else c for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"recipe: `train.class_weight` = 'balanced' needs training examples of every class; "
                             f"class(es) {empty} have none. Give a mapping {{label: weight}} instead, or add examples.")
        return {c: float(len(labels) / (n_classes * counts[c])) for c in range(n_classes)}
    return {c: float(weight.get(names[c], 1.0)) if c < len(names) else 1.0 for c in range(n_classes)}


def _read(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe: {str(path)!r} does not exist.")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except ValueError as error:  # a TOMLDecodeError, or an integer of more than 4,300 digits
            raise ValueError(f"recipe: {str(path)!r} is not valid TOML: {error}.") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"recipe: {str(path)!r} is not valid YAML: {error}.") from None
        return data or {}
    raise ValueError(f"recipe: {str(path)!r} must end in .toml, .yaml or .yml.")


def set_key(data, dotted, value):
    """`set_key(d, "train.epochs", 3)`: a command-line override into a recipe dict."""
    *tables, key = dotted.split(".")
    node = data
    for table in tables:
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            raise ValueError(f"recipe: cannot set {dotted!r}: {table!r} is not a table.")
    node[key] = value


def load_recipe(path, overrides=()):
    """Reads a recipe file; `overrides` are `(dotted_key, value)` pairs applied on top."""
    data = _read(path)
    if not isinstance(data, dict):
        raise ValueError(f"recipe: {str(path)!r} must hold a table of keys. Got {type(data).__name__}.")
    for key, value in overrides:
        set_key(data, key, value)
    allowed = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} at the top of {str(path)!r}. Allowed keys: {sorted(allowed)}.")
    data.setdefault("name", Path(path).stem)
    return Recipe(**data)
