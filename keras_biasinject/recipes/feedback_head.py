"""Method "feedback_head": the extended output layer, trained on the run's bias injection.

The adapters `bias_injection` trained stay frozen; a `FeedbackHead` on the final hidden states learns,
at every token, the label the example's control stands for (sigmoid: P(control > neutral)). While it
trains, each example runs under a control drawn uniformly from neutral +- `control_jitter`,
independently of its label: the head has to read the text, since the control it sees says nothing
about the label. (Trained at the label's own control, a head learns to read the control back, and a
loop built on it would only ever see its own input.) The report gives its accuracy on the test
split at the neutral control and at the ends of the jitter range, which shows whether it did.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_biasinject.layers.feedback_head import FeedbackHead
from keras_biasinject.recipes.datasets import split_dataset
from keras_biasinject.recipes.divergence import NonFiniteGuard
from keras_biasinject.recipes.run_folder import base_model
from keras_biasinject.rewrite.adapter_file import load_adapter
from keras_biasinject.rewrite.feedback import add_feedback_head
from keras_biasinject.rewrite.frozen import FrozenSnapshot, count_params
from keras_biasinject.rewrite.kerashub import preprocessor_detached


def head_target(control, recipe):
    """What the head learns for an example whose control is `control` `[B, control_dim]`."""
    offset = control - tf.constant(np.broadcast_to(recipe.inject.neutral, (recipe.inject.control_dim,)), tf.float32)
    if recipe.feedback.activation == "sigmoid":
        return tf.cast(offset > 0, tf.float32)
    if recipe.feedback.activation == "tanh":
        return tf.clip_by_value(offset, -1.0, 1.0)
    return offset


def head_dataset(recipe, split, preprocessor, seed):
    """(x with a random control, {"feedback": per-token target}, {"feedback": padding mask})."""
    jitter, dim = float(recipe.feedback.control_jitter), recipe.inject.control_dim
    neutral = tf.constant(np.broadcast_to(recipe.inject.neutral, (dim,)), tf.float32)

    def for_head(index, batch):
        x, _, _ = batch
        target = head_target(tf.cast(x["control"], tf.float32), recipe)  # (B, F)
        batch, length = tf.shape(x["token_ids"])[0], tf.shape(x["token_ids"])[1]
        control = neutral + tf.random.stateless_uniform((batch, dim), seed=tf.stack([tf.cast(seed, tf.int64), index]), minval=-jitter, maxval=jitter)
        per_token = tf.broadcast_to(target[:, None, :], (batch, length, dim))  # (B, T, F)
        return {**x, "control": control}, {"feedback": per_token}, {"feedback": tf.cast(x["padding_mask"], tf.float32)}

    ds = split_dataset(recipe, split, preprocessor, True, shuffle=split == "train")
    return ds.enumerate().map(for_head)  # the batch index seeds its controls: a new draw per batch, reproducible


def head_accuracy(model, recipe, ds, control):
    """(accuracy, mean reading) of the pooled reading on `ds` with every example at `control`."""
    hits, total, readings = 0, 0, []
    for x, y, _ in ds:
        reading = model.read_feedback({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]},
                                      control=np.full((len(x["token_ids"]), recipe.inject.control_dim), control, "float32"))
        label = y["feedback"].numpy()[:, 0, :]
        threshold = 0.5 if recipe.feedback.activation == "sigmoid" else 0.0
        hits += int(np.sum((reading > threshold) == (label > threshold)))
        total += label.size
        readings.append(reading)
    return hits / max(total, 1), float(np.mean(np.concatenate(readings)))


def run_feedback_head(recipe, run_dir, verbose=1):
    """Loads the run's bias injection, adds and trains the head; returns (rows, history, model)."""
    keras.utils.set_random_seed(recipe.train.seed)
    model = load_adapter(base_model(recipe), run_dir / "adapter")
    fb = recipe.feedback
    add_feedback_head(model, FeedbackHead(recipe.inject.control_dim, pooling=fb.pooling, activation=fb.activation))
    head_weights = {id(v) for v in model.feedback_head.weights}
    for variable in model.trainable_weights:
        if id(variable) not in head_weights:
            variable.trainable = False  # the adapters stay as bias_injection left them
    train, validation, test = (head_dataset(recipe, split, model.preprocessor, recipe.train.seed + i)
                               for i, split in enumerate(("train", "validation", "test")))
    steps = int(train.cardinality().numpy()) * fb.epochs
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, steps - warmup), alpha=0.1,
                                                      warmup_target=fb.learning_rate, warmup_steps=warmup)
    sigmoid = fb.activation == "sigmoid"
    model._compile_metrics = None  # the loss only (a compile that names no metrics keeps earlier ones); accuracy below
    model.compile(optimizer=keras.optimizers.Adam(schedule), metrics=None, weighted_metrics=None,
                  loss={"feedback": keras.losses.BinaryCrossentropy() if sigmoid else keras.losses.MeanSquaredError()})
    frozen, start = FrozenSnapshot(model), time.perf_counter()
    with preprocessor_detached(model):
        fit = model.fit(train, validation_data=validation, epochs=fb.epochs, verbose=verbose,
                        callbacks=[NonFiniteGuard("feedback_head", fb.learning_rate)])  # raises at NaN/inf
        seconds = time.perf_counter() - start
        if frozen.changed(model):
            raise RuntimeError(f"feedback_head: weight {frozen.changed(model)[0]!r} changed while only the head trains; "
                               "this is a bug, please report it.")
        rows = []
        neutral = float(np.mean(recipe.inject.neutral))
        for label, value in (("neutral", neutral), ("-jitter", neutral - fb.control_jitter), ("+jitter", neutral + fb.control_jitter)):
            accuracy, mean_reading = head_accuracy(model, recipe, test, value)
            rows.append({"method": f"feedback_head (control {label} = {value:g})", "metric": "head_accuracy",
                         "value": accuracy, "mean_reading": mean_reading, "trainable_params": count_params(model.feedback_head.weights),
                         "seconds": round(seconds, 1) if label == "neutral" else 0.0, "base_weights_unchanged": True})
    history = {k: [float(v) for v in values] for k, values in fit.history.items()}
    return rows, history, model
