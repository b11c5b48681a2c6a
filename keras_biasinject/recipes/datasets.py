"""The data side of a recipe, shared by `finetune`, `evaluate` and `steering`: its splits, the
`DataConfig` of each, tokenized `tf.data` pipelines, controls set at evaluation, and the score.

One convention for controls everywhere: a control value is what the model receives (as in the data's
control columns, `model(..., control=c)` and `kbi serve`), a number meaning that number in every
control dimension; the learned behaviour is off at the injection's `neutral` control, which may be a
vector with unequal entries (`control_vector(recipe, None)`).
"""

import dataclasses
import math

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_biasinject.data.pipeline import FILE_SUFFIXES, DataConfig, make_dataset
from keras_biasinject.distribute.workarounds import keras_fixes

DEFAULT_SPLITS = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}
_SET_FROM_TRAIN = ("batch_size", "shuffle_seed", "reshuffle")  # DataConfig fields a recipe sets from [train]


def splits(recipe):
    """(the [data] table without `splits`, {train, validation, test}: TFDS split strings or files)."""
    data = dict(recipe.data)
    named = {**DEFAULT_SPLITS, **data.pop("splits", {})}
    unknown = sorted(set(named) - set(DEFAULT_SPLITS))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in [data.splits]. Allowed keys: {sorted(DEFAULT_SPLITS)}.")
    n, m = recipe.train.max_train_examples, recipe.train.max_eval_examples
    if n is not None and named["train"] == DEFAULT_SPLITS["train"]:
        named["train"] = f"train[:{n}]"
    if m is not None and named["test"] == DEFAULT_SPLITS["test"]:
        named["test"] = f"test[:{m}]"
    if m is not None and named["validation"] == DEFAULT_SPLITS["validation"]:
        named["validation"] = f"train[-{m}:]"
    return data, named


def data_config(recipe, data=None, split=None, shuffle=False):
    """The `DataConfig` of one split (`split` a file replaces the source); `data` from `splits`."""
    data = splits(recipe)[0] if data is None else data
    # Step-level backups resume by skipping the steps done, so every epoch keeps one seeded order.
    fields = {**data, "batch_size": recipe.train.batch_size, "shuffle_seed": recipe.train.seed if shuffle else None,
              "reshuffle": recipe.train.save_freq == "epoch"}
    if split is not None and str(split).endswith(FILE_SUFFIXES):
        fields["source"] = split
    allowed = sorted([f.name for f in dataclasses.fields(DataConfig) if f.name not in _SET_FROM_TRAIN] + ["splits"])
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in [data]. Allowed keys: {allowed}.")
    try:
        return DataConfig(**fields)
    except TypeError as error:
        raise ValueError(f"recipe: [data] {error}. Allowed keys: {allowed}.") from None


def num_classes(recipe):
    """[model] num_classes, else the number of labels the data names."""
    return recipe.model.num_classes or len(data_config(recipe).class_names or [])


def split_dataset(recipe, split, preprocessor, with_control_input, shuffle=False):
    """The batched, tokenized pipeline of `split` ("train", "validation" or "test")."""
    data, named = splits(recipe)
    source = named[split]
    source_is_file = str(source).endswith(FILE_SUFFIXES)
    ds = make_dataset(data_config(recipe, data, source, shuffle), preprocessor, split=None if source_is_file else source)
    if not with_control_input:  # the control groups have no control input
        ds = ds.map(lambda x, *rest: ({k: v for k, v in x.items() if k != "control"}, *rest))
    options = tf.data.Options()  # multi-worker: each worker takes its slice of every global batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def control_vector(recipe, value=None):
    """The control `[control_dim]` for `value`: None -> the neutral control (the learned behaviour
    off); a number -> that number in every dimension; a sequence -> as it is."""
    dim = recipe.inject.control_dim
    if value is None:
        value = recipe.inject.neutral
    vector = np.broadcast_to(np.asarray(value, "float32"), (dim,)).copy()
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"recipe: a control must be finite. Got {value!r}.")
    return vector


def with_control(ds, control):
    """The same examples with every example's control set to `control` (`[control_dim]`)."""
    control = tf.constant(np.asarray(control, "float32"))

    def set_control(x, *rest):
        return ({**x, "control": tf.broadcast_to(control, tf.shape(x["control"]))}, *rest)

    return ds.map(set_control)


def score(model, recipe, ds):
    """(metric name, value) on `ds`: accuracy for classification, perplexity for the LM."""
    with keras_fixes():  # evaluate builds the model like fit (keras-team/keras#20329)
        values = model.evaluate(ds, verbose=0, return_dict=True)
    if recipe.task == "classification":
        return "accuracy", float(values["accuracy"])
    return "perplexity", float(math.exp(values["loss"]))


def labels_and_predictions(model, ds):
    """(class ids `[n]`, predicted class ids `[n]`) of a classifier on `ds`, batch by batch in order.

    The model is called eagerly per batch (not `predict`): the labels travel with their inputs, and it
    runs the same under any strategy or backend."""
    labels, predictions = [], []
    for x, y, *_ in ds:
        logits = model(x, training=False)  # (B, num_classes)
        labels.append(np.asarray(y).reshape(-1))
        predictions.append(np.argmax(keras.ops.convert_to_numpy(logits), axis=-1))
    return np.concatenate(labels), np.concatenate(predictions)


def train_labels(ds):
    """The class ids of every example in a (tokenized, batched) classification split."""
    return np.concatenate([np.asarray(y).reshape(-1) for _, y, *_ in ds])


def compile_for_recipe(model, optimizer="adam"):
    """Compiles `model` with the loss and the one accuracy metric every recipe method uses (and that
    `score` reads): classifier logits over classes, or LM logits over the vocabulary.

    For a causal LM the sample weights are the token mask (padding, and the prompt with completion-only
    loss, weigh 0), so the loss is the mean over the weighted tokens ("mean_with_sample_weight", as
    TRL's and Hugging Face's losses): Keras' default would divide by every position, padding included,
    and understate the loss and perplexity. A classifier keeps the default, sum_i w_i l_i / n, where the
    weights are class weights."""
    causal = isinstance(model, keras_hub.models.CausalLM)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight" if causal else "sum_over_batch_size"),
        metrics=None,  # not KerasHub's "auto" metrics: one accuracy, weighted by the padding mask
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
