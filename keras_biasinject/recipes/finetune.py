"""`finetune(recipe, out_dir)`: train bias injection and its control groups on the same data and
budget, evaluate each, and write `report.json` and plots.

Everything is standard Keras: `model.fit` with validation, early stopping, a warm-up + cosine
learning-rate schedule, TensorBoard logs, a best-weights checkpoint and a backup: per epoch
(`BackupAndRestore`, made atomic) or, with `[train] save_freq = N`, every N steps, where a killed
run resumes at exactly that step (`fit_resumable`). A finished method's result is kept in `report.json`; running
the same recipe into the same folder again skips it, so Ctrl-C never loses finished work. Training that reaches
a NaN or inf loss or weight stops and raises `TrainingDiverged` (recipes/divergence.py); nothing of that method
is written. The frozen base's classifier head is fitted as a linear probe on cached features, to convergence,
its L2 strength chosen on the validation split (recipes/linear_probe.py): as its own users fit it.
"""

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import keras
import tensorflow as tf

from keras_biasinject.distribute.backup import AtomicBackupAndRestore
from keras_biasinject.distribute.resume import fit_resumable
from keras_biasinject.distribute.strategy import is_chief, make_strategy, per_replica_batch
from keras_biasinject.distribute.workarounds import keras_fixes
from keras_biasinject.models.load import pooling_of, resolve_preset, with_pooling
from keras_biasinject.models.pooling import checkpoint_pooling
from keras_biasinject.recipes.config import Recipe, class_weights
from keras_biasinject.recipes.feedback_head import run_feedback_head
from keras_biasinject.recipes.datasets import (compile_for_recipe, control_vector, data_config, labels_and_predictions, score,
                                               split_dataset, train_labels, with_control)
from keras_biasinject.recipes.linear_probe import fit_linear_probe
from keras_biasinject.recipes.divergence import NonFiniteGuard, TrainingDiverged
from keras_biasinject.recipes.methods import PREPARE
from keras_biasinject.recipes.report import classification_metrics, read_report, write_plots
from keras_biasinject.recipes.run_folder import base_model
from keras_biasinject.recipes.steering import steering_curve
from keras_biasinject.rewrite.adapter_file import save_adapter
from keras_biasinject.rewrite.frozen import FrozenSnapshot, count_params
from keras_biasinject.rewrite.inject import refuse_silent_distribution
from keras_biasinject.rewrite.injected_model import InjectedModel, build_optimizer
from keras_biasinject.rewrite.kerashub import preprocessor_detached


def _peak_learning_rate(recipe, method):
    return recipe.train.full_learning_rate if method == "full" else recipe.train.learning_rate


def _optimizer(recipe, steps, method):
    peak = _peak_learning_rate(recipe, method)
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - warmup), alpha=0.1, warmup_target=peak, warmup_steps=warmup
    )
    return keras.optimizers.Adam(schedule)


def _callbacks(recipe, run_dir, method):
    """EarlyStopping, the best-weights checkpoint, TensorBoard and, last, the guard that stops at the
    first NaN or inf loss and raises `TrainingDiverged` (the backup is added by `_fit`)."""
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=recipe.train.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "checkpoints" / f"{method}.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.TensorBoard(str(run_dir / "logs" / method)),
        NonFiniteGuard(method, _peak_learning_rate(recipe, method)),
    ]


def _class_weights(recipe, train):
    """{class id: weight} from `[train] class_weight` and the training labels, or None."""
    return class_weights(recipe, train_labels(train)) if recipe.train.class_weight is not None else None


def _fit(model, recipe, method, train, validation, run_dir, backup_dir, strategy, verbose):
    """`model.fit` with backups: per epoch (Keras' BackupAndRestore, made atomic, in `run_dir`), or every
    `save_freq` steps (`fit_resumable`: a killed run resumes at exactly the step of its last backup), and
    `[train] class_weight` as Keras' `class_weight`. Returns (history dict, the step resumed from)."""
    callbacks = _callbacks(recipe, run_dir, method)
    weights = _class_weights(recipe, train)
    try:
        with keras_fixes():  # multi-worker fit: keras-team/keras#20329, tensorflow/tensorflow#72388
            if recipe.train.save_freq == "epoch":
                backup = AtomicBackupAndRestore(str(run_dir / "backup" / method))  # each worker its own
                fit = model.fit(train, validation_data=validation, epochs=recipe.train.epochs,
                                callbacks=[backup, *callbacks], verbose=verbose, class_weight=weights)
                histories, resumed = [fit.history], None
            else:
                histories, resumed = fit_resumable(model, train, recipe.train.epochs, str(backup_dir), recipe.train.save_freq,
                                                   chief=is_chief(strategy), callbacks=callbacks, validation_data=validation,
                                                   verbose=verbose, class_weight=weights)
    except TrainingDiverged:  # the next run starts this method afresh, not from NaN weights
        shutil.rmtree(run_dir / "backup" / method, ignore_errors=True)  # this worker's epoch backup
        if is_chief(strategy):
            shutil.rmtree(backup_dir, ignore_errors=True)  # the shared step backup
        raise
    history = {}
    for part in histories:
        for key, values in part.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    return history, resumed


def _write_json(path, data):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _base_model(recipe):
    """A fresh base (`run_folder.base_model`); a classifier with `[model] pooling` when that is not "auto"."""
    model = base_model(recipe, dropout=recipe.model.dropout)
    if recipe.task == "classification" and recipe.model.pooling != "auto":
        model = with_pooling(model, recipe.model.pooling)
    return model


def _prepared_model(recipe, method, strategy):
    """A fresh base, prepared for `method`, created in the strategy's scope."""
    with strategy.scope():
        return PREPARE[method](_base_model(recipe), recipe)


def _result_row(method, metric, value, trainable, seconds, injected):
    return {"method": method, "metric": metric, "value": value, "trainable_params": trainable,
            "seconds": round(seconds, 1), "base_weights_unchanged": True if injected else None}


def _scored_row(model, recipe, method, ds, trainable, seconds, injected):
    """The result row of `model` on `ds`; for classification with the majority baseline, macro-F1,
    per-class recall and predictions per class beside accuracy (`classification_metrics`), and a printed
    WARNING line when the method learned nothing beyond answering the majority class."""
    row = _result_row(method, *score(model, recipe, ds), trainable, seconds, injected)
    if recipe.task != "classification":
        return row
    metrics = classification_metrics(*labels_and_predictions(model, ds), data_config(recipe).class_names)
    row.update({"pooling": pooling_of(model), **{k: v for k, v in metrics.items() if k != "accuracy"}})
    if row["learned_nothing"]:
        print(f"WARNING: {method}: {row['warning']}", flush=True)
    return row


def run_method(recipe, method, run_dir, verbose=1, strategy=None, backup_dir=None):
    """Loads a fresh base, prepares `method`, fits it and returns (rows, history, model).

    `backup_dir`: with `[train] save_freq = N`, where the step-level backup goes (default
    `run_dir/backup/<method>`); under multi-worker one folder all workers read, the chief writes.

    `strategy`: a tf.distribute strategy or, on JAX, a keras.distribution (see
    keras_biasinject.distribute.make_strategy); the model, its adapters and the optimizer are made in
    its scope. `recipe.train.batch_size` is the global batch, split evenly over the strategy's replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    per_replica_batch(recipe.train.batch_size, strategy)  # raises unless it divides evenly
    with _distribution_scope(strategy):
        return _run_method(recipe, method, run_dir, verbose, strategy, backup_dir)


def _distribution_scope(strategy):
    """A keras.distribution (--strategy model-parallel, JAX) stays current through fit and evaluation too,
    where the trainer reads it to shard each batch over the data axis; for tf.distribute, nothing."""
    if isinstance(strategy, (keras.distribution.DataParallel, keras.distribution.ModelParallel)):
        return strategy.scope()
    return contextlib.nullcontext()


def _run_method(recipe, method, run_dir, verbose, strategy, backup_dir):
    keras.utils.set_random_seed(recipe.train.seed)
    model = _prepared_model(recipe, method, strategy)
    injected = isinstance(model, InjectedModel)
    train, validation, test = (
        split_dataset(recipe, split, model.preprocessor, injected, shuffle=split == "train")
        for split in ("train", "validation", "test")
    )
    steps = int(train.cardinality().numpy()) * recipe.train.epochs
    trainable = count_params(model.trainable_weights)
    with strategy.scope():
        compile_for_recipe(model, _optimizer(recipe, steps, method))
    if trainable and method != "base":  # every method that trains: its step traced once (see `build_optimizer`)
        build_optimizer(model)
    frozen = FrozenSnapshot(model)
    history, resumed, probe, start = {}, None, None, time.perf_counter()
    with preprocessor_detached(model):  # the datasets are tokenized already
        if method == "base" and recipe.task == "classification":  # the head as a linear probe, to convergence
            probe = fit_linear_probe(model, train, validation, _class_weights(recipe, train))
        elif trainable and method != "base":  # the LM's base is zero-shot: nothing trains
            backup_dir = Path(backup_dir) if backup_dir is not None else run_dir / "backup" / method
            history, resumed = _fit(model, recipe, method, train, validation, run_dir, backup_dir, strategy, verbose)
        seconds = time.perf_counter() - start
        if injected and frozen.changed(model):
            raise RuntimeError(f"{method}: frozen base weight {frozen.changed(model)[0]!r} changed during training; "
                               "this is a bug, please report it.")
        rows = [_scored_row(model, recipe, method, test, trainable, seconds, injected)]
        if probe:
            rows[0]["probe"] = probe
        if resumed:
            rows[0]["resumed_from_step"] = resumed
        if injected and recipe.task == "classification":
            # The run-time switch: the same trained model with the learned behaviour switched off.
            off = with_control(test, control_vector(recipe))
            rows.append(_scored_row(model, recipe, f"{method} (control off)", off, trainable, 0.0, injected))
    return rows, history, model


def _with_defaults(saved):
    """A report's recipe with keys added by later versions filled in with their defaults."""
    try:
        return json.loads(json.dumps(Recipe(**saved).to_dict()))
    except (TypeError, ValueError):
        return saved


def _start_report(recipe, run_dir):
    """The report to continue: the one in `run_dir` if it is this recipe's (interrupted), else empty."""
    report_path = run_dir / "report.json"
    as_json = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as report.json holds them
    if not report_path.exists():
        return {"recipe": as_json, "results": [], "history": {}}
    previous = read_report(report_path)
    if _with_defaults(previous["recipe"]) != as_json:
        raise ValueError(
            f"finetune: {str(run_dir)!r} holds the report of a different recipe; it is never overwritten. "
            "Choose another output folder, or delete that one."
        )
    if recipe.task == "classification":
        pooling = recipe.model.pooling if recipe.model.pooling != "auto" else checkpoint_pooling(resolve_preset(recipe.model.spec))
        earlier = {row.get("pooling", "cls") for row in previous["results"]}  # rows from before pooling was recorded: cls
        if earlier - {pooling or "cls"}:
            raise ValueError(
                f"finetune: {str(run_dir)!r} holds results of classifiers with {sorted(earlier)} pooling, and this run's "
                f"[model] pooling={recipe.model.pooling!r} gives {pooling or 'cls'!r} (reports without a pooling field were "
                "written before it could be chosen, with KerasHub's [CLS] pooling). Choose another output folder, or set "
                "[model] pooling to match."
            )
    return previous  # the same run, interrupted: keep what finished


def _keep_outputs(recipe, method, model, run_dir, report):
    """What a finished bias injection leaves: its adapter, the judge (classification), the steering curve."""
    if method == "feedback_head":
        save_adapter(model, run_dir / "adapter", overwrite=True)  # the same adapters, now with the head
        return
    if method != "bias_injection":
        return
    save_adapter(model, run_dir / "adapter", overwrite=True)
    if recipe.task == "classification":
        model.save(run_dir / "classifier.keras")  # the judge for the LM recipe's steering curve
    if recipe.task == "causal_lm" and recipe.steer.judge is not None:
        report["steering"] = steering_curve(model, recipe, recipe.steer)


def finetune(recipe, out_dir, verbose=1, strategy="default"):
    """Runs every method of `recipe` into `out_dir`; returns the report dict (also `report.json`).

    `strategy`: "default", "mirrored", "multi-worker" (cluster from $TF_CONFIG), "tpu" or, on the JAX
    backend, "model-parallel"; or a tf.distribute strategy or a keras.distribution. Under multi-worker
    every worker runs this same call; worker 0 writes `out_dir`, the others `out_dir/worker-N` (their
    copies of the same results)."""
    refuse_silent_distribution("finetune")  # before anything is written
    strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
    run_dir = Path(out_dir)
    if not is_chief(strategy):
        run_dir = run_dir / f"worker-{strategy.cluster_resolver.task_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    report = _start_report(recipe, run_dir)
    done = {row["method"] for row in report["results"]}
    for method in [m for m in recipe.train.methods if m not in done]:
        if method == "feedback_head":  # the head on bias_injection's model (one device; a small fit)
            rows, history, model = run_feedback_head(recipe, run_dir, verbose=verbose)
        else:
            rows, history, model = run_method(recipe, method, run_dir, verbose=verbose, strategy=strategy,
                                              backup_dir=Path(out_dir) / "backup" / method)  # the chief's: shared
        _keep_outputs(recipe, method, model, run_dir, report)
        report["results"] += rows
        report["history"][method] = history
        _write_json(run_dir / "report.json", report)
        del model
        keras.backend.clear_session()
    write_plots(report, run_dir)
    return report
