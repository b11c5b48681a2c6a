"""`finetune(recipe, out_dir)`: train bias injection and its control groups on the same data and
budget, evaluate each, and write `report.json` and plots.

Everything is standard Keras: `model.fit` with validation, early stopping, a warm-up + cosine
learning-rate schedule, TensorBoard logs, a best-weights checkpoint and a backup: per epoch
(`BackupAndRestore`, made atomic) or, with `[train] save_freq = N`, every N steps, where a killed
run resumes at exactly that step (`fit_resumable`). A finished method's result is kept in `report.json`; running
the same recipe into the same folder again skips it, so Ctrl-C never loses finished work.
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_biasinject.data.pipeline import FILE_SUFFIXES, DataConfig, make_dataset
from keras_biasinject.distribute.backup import AtomicBackupAndRestore
from keras_biasinject.distribute.resume import fit_resumable
from keras_biasinject.distribute.strategy import is_chief, make_strategy, per_replica_batch
from keras_biasinject.distribute.workarounds import keras_fixes
from keras_biasinject.models.load import load
from keras_biasinject.recipes.methods import PREPARE, count
from keras_biasinject.rewrite.inject import refuse_silent_distribution
from keras_biasinject.rewrite.injected_model import InjectedModel

LOAD_TASK = {"classification": "classifier", "causal_lm": "causal_lm"}
DEFAULT_SPLITS = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}


def _splits(recipe):
    """train / validation / test: TFDS split strings, or files (each replaces `source`)."""
    data = dict(recipe.data)
    splits = {**DEFAULT_SPLITS, **data.pop("splits", {})}
    unknown = sorted(set(splits) - set(DEFAULT_SPLITS))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in [data.splits]. Allowed keys: {sorted(DEFAULT_SPLITS)}.")
    n = recipe.train.max_train_examples
    if n is not None and splits["train"] == DEFAULT_SPLITS["train"]:
        splits["train"] = f"train[:{n}]"
    m = recipe.train.max_eval_examples
    if m is not None and splits["test"] == DEFAULT_SPLITS["test"]:
        splits["test"] = f"test[:{m}]"
    if m is not None and splits["validation"] == DEFAULT_SPLITS["validation"]:
        splits["validation"] = f"train[-{m}:]"
    return data, splits


def _data_config(recipe, data, split=None, shuffle=False):
    # Step-level backups resume by skipping the steps done, so every epoch keeps one seeded order.
    fields = {**data, "batch_size": recipe.train.batch_size, "shuffle_seed": recipe.train.seed if shuffle else None,
              "reshuffle": recipe.train.save_freq == "epoch"}
    if split is not None and str(split).endswith(FILE_SUFFIXES):
        fields["source"] = split
    internal = ("batch_size", "shuffle_seed", "reshuffle")  # set from [train]
    allowed = sorted([f.name for f in dataclasses.fields(DataConfig) if f.name not in internal] + ["splits"])
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in [data]. Allowed keys: {allowed}.")
    try:
        return DataConfig(**fields)
    except TypeError as error:
        raise ValueError(f"recipe: [data] {error}. Allowed keys: {allowed}.") from None


def _dataset(recipe, data, split, preprocessor, injected, shuffle):
    source_is_file = str(split).endswith(FILE_SUFFIXES)
    config = _data_config(recipe, data, split, shuffle)
    ds = make_dataset(config, preprocessor, split=None if source_is_file else split)
    if not injected:  # the control groups have no control input
        ds = ds.map(lambda x, *rest: ({k: v for k, v in x.items() if k != "control"}, *rest))
    options = tf.data.Options()  # multi-worker: each worker takes its slice of every global batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _with_control(ds, value):
    """The same examples with every control set to `value` (the on/off switch at evaluation)."""
    def set_control(x, *rest):
        return ({**x, "control": tf.fill(tf.shape(x["control"]), tf.constant(value, tf.float32))}, *rest)

    return ds.map(set_control)


def _optimizer(recipe, steps, method):
    peak = recipe.train.full_learning_rate if method == "full" else recipe.train.learning_rate
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - warmup), alpha=0.1, warmup_target=peak, warmup_steps=warmup
    )
    return keras.optimizers.Adam(schedule)


def _compile(model, recipe, steps, method):
    # Classifier logits over classes, or LM logits over the vocabulary: the same loss and metric.
    model.compile(
        optimizer=_optimizer(recipe, steps, method),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=None,  # not KerasHub's "auto" metrics: one accuracy, weighted by the padding mask
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def _callbacks(recipe, run_dir, method):
    """EarlyStopping, the best-weights checkpoint and TensorBoard (the backup is added by `_fit`)."""
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=recipe.train.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "checkpoints" / f"{method}.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.TensorBoard(str(run_dir / "logs" / method)),
    ]


def _fit(model, recipe, method, train, validation, run_dir, backup_dir, strategy, verbose):
    """`model.fit` with backups: per epoch (Keras' BackupAndRestore, made atomic, in `run_dir`), or every
    `save_freq` steps (`fit_resumable`: a killed run resumes at exactly the step of its last backup).
    Returns (history dict, the step resumed from)."""
    callbacks = _callbacks(recipe, run_dir, method)
    with keras_fixes():  # multi-worker fit: keras-team/keras#20329, tensorflow/tensorflow#72388
        if recipe.train.save_freq == "epoch":
            backup = AtomicBackupAndRestore(str(run_dir / "backup" / method))  # each worker its own
            fit = model.fit(train, validation_data=validation, epochs=recipe.train.epochs,
                            callbacks=[backup, *callbacks], verbose=verbose)
            histories, resumed = [fit.history], None
        else:
            histories, resumed = fit_resumable(model, train, recipe.train.epochs, str(backup_dir), recipe.train.save_freq,
                                               chief=is_chief(strategy), callbacks=callbacks, validation_data=validation,
                                               verbose=verbose)
    history = {}
    for part in histories:
        for key, values in part.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    return history, resumed


def _frozen_snapshot(model):
    return {id(v): np.array(keras.ops.convert_to_numpy(v)) for v in model.weights if not v.trainable}


def _unchanged(model, snapshot):
    return all(np.array_equal(keras.ops.convert_to_numpy(v), snapshot[id(v)]) for v in model.weights if id(v) in snapshot)


def _score(model, recipe, ds):
    """(metric name, value): accuracy for classification, perplexity for the LM."""
    with keras_fixes():  # evaluate builds the model like fit (keras-team/keras#20329)
        values = model.evaluate(ds, verbose=0, return_dict=True)
    if recipe.task == "classification":
        return "accuracy", float(values["accuracy"])
    return "perplexity", float(math.exp(values["loss"]))


def _write_json(path, data):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_method(recipe, method, run_dir, verbose=1, strategy=None, backup_dir=None):
    """Loads a fresh base, prepares `method`, fits it and returns (rows, history, model).

    `backup_dir`: with `[train] save_freq = N`, where the step-level backup goes (default
    `run_dir/backup/<method>`); under multi-worker one folder all workers read, the chief writes.

    `strategy`: a tf.distribute strategy (see keras_biasinject.distribute.make_strategy); the model,
    its adapters and the optimizer are made in its scope. `recipe.train.batch_size` is the global
    batch, split evenly over the strategy's replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    per_replica_batch(recipe.train.batch_size, strategy)  # raises unless it divides evenly
    keras.utils.set_random_seed(recipe.train.seed)
    extra = {}
    if recipe.task == "classification":
        extra["num_classes"] = recipe.model.num_classes or len(_data_config(recipe, _splits(recipe)[0]).class_names or [])
    if recipe.model.dropout is not None:
        extra["dropout"] = float(recipe.model.dropout)
    with strategy.scope():
        model = load(recipe.model.spec, task=LOAD_TASK[recipe.task], sequence_length=recipe.model.sequence_length, **extra)
        model = PREPARE[method](model, recipe)
    injected = isinstance(model, InjectedModel)
    preprocessor = model.preprocessor
    data, splits = _splits(recipe)
    train = _dataset(recipe, data, splits["train"], preprocessor, injected, shuffle=True)
    validation = _dataset(recipe, data, splits["validation"], preprocessor, injected, shuffle=False)
    test = _dataset(recipe, data, splits["test"], preprocessor, injected, shuffle=False)
    model.preprocessor = None  # the datasets are tokenized already; put back for generate and saving
    steps = int(train.cardinality().numpy()) * recipe.train.epochs
    trainable = count(model.trainable_weights)
    with strategy.scope():
        _compile(model, recipe, steps, method)
    frozen = _frozen_snapshot(model)
    start = time.perf_counter()
    history, resumed = {}, None
    if trainable and not (method == "base" and recipe.task == "causal_lm"):
        backup_dir = Path(backup_dir) if backup_dir is not None else run_dir / "backup" / method
        history, resumed = _fit(model, recipe, method, train, validation, run_dir, backup_dir, strategy, verbose)
    seconds = time.perf_counter() - start
    if injected and not _unchanged(model, frozen):
        raise RuntimeError(f"{method}: a frozen base weight changed during training; this is a bug, please report it.")
    metric, value = _score(model, recipe, test)
    rows = [{"method": method, "metric": metric, "value": value, "trainable_params": trainable,
             "seconds": round(seconds, 1), "base_weights_unchanged": True if injected else None}]
    if resumed:
        rows[0]["resumed_from_step"] = resumed
    if injected and recipe.task == "classification":
        # The run-time switch: the same trained model with the learned behaviour switched off.
        neutral = float(np.mean(recipe.inject.neutral))
        metric, value = _score(model, recipe, _with_control(test, neutral))
        rows.append({"method": f"{method} (control off)", "metric": metric, "value": value,
                     "trainable_params": trainable, "seconds": 0.0, "base_weights_unchanged": True})
    model.preprocessor = preprocessor
    return rows, history, model


def _with_defaults(saved):
    """A report's recipe with keys added by later versions filled in with their defaults."""
    from keras_biasinject.recipes.config import Recipe

    try:
        return json.loads(json.dumps(Recipe(**saved).to_dict()))
    except (TypeError, ValueError):
        return saved


def finetune(recipe, out_dir, verbose=1, strategy="default"):
    """Runs every method of `recipe` into `out_dir`; returns the report dict (also `report.json`).

    `strategy`: "default", "mirrored", "multi-worker" (cluster from $TF_CONFIG) or "tpu"; or a
    tf.distribute strategy. Under multi-worker every worker runs this same call; worker 0 writes
    `out_dir`, the others `out_dir/worker-N` (their copies of the same results)."""
    from keras_biasinject.recipes.report import write_plots

    refuse_silent_distribution("finetune")  # before anything is written
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
    run_dir = Path(out_dir)
    if not is_chief(strategy):
        run_dir = run_dir / f"worker-{strategy.cluster_resolver.task_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path = run_dir / "report.json"
    as_json = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as report.json holds them
    report = {"recipe": as_json, "results": [], "history": {}}
    if report_path.exists():
        previous = json.loads(report_path.read_text())
        if _with_defaults(previous.get("recipe")) != as_json:
            raise ValueError(
                f"finetune: {str(run_dir)!r} holds the report of a different recipe; it is never overwritten. "
                "Choose another output folder, or delete that one."
            )
        report = previous  # the same run, interrupted: keep what finished
    done = {row["method"] for row in report["results"]}
    for method in recipe.train.methods:
        if method in done:
            continue
        rows, history, model = run_method(recipe, method, run_dir, verbose=verbose, strategy=strategy,
                                          backup_dir=Path(out_dir) / "backup" / method)  # the chief's: shared
        if method == "bias_injection":
            from keras_biasinject.rewrite.adapter_file import save_adapter

            save_adapter(model, run_dir / "adapter", overwrite=True)
        if recipe.task == "classification" and method == "bias_injection":
            model.save(run_dir / "classifier.keras")  # the judge for the LM recipe's steering curve
        if recipe.task == "causal_lm" and method == "bias_injection" and recipe.steer.judge is not None:
            from keras_biasinject.recipes.steering import steering_curve

            report["steering"] = steering_curve(model, recipe, recipe.steer)
        report["results"] += rows
        report["history"][method] = history
        _write_json(report_path, report)
        del model
        keras.backend.clear_session()
    write_plots(report, run_dir)
    return report
