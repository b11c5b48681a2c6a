"""`fit_resumable`: `model.fit` that a killed job resumes at the last step-level backup, exactly.

Keras' `BackupAndRestore(save_freq=N)` saves every N steps but restores only the epoch: the
resumed run replays the epoch's first batches on already-updated weights. Here the backup (written
atomically by `AtomicBackupAndRestore`: a half-written one is never loaded) holds the optimizer,
whose `iterations` is the number of steps done; the resumed fit skips exactly those batches.

Under MultiWorkerMirroredStrategy only the chief writes the backup (workers hold identical
weights); every worker reads it on restart, so `backup_dir` must be on a filesystem all workers
share. `dataset` must give the same batches in the same order every epoch (no reshuffling per
epoch: shuffle once with a seed before batching, `reshuffle_each_iteration=False`).
"""

import contextlib
import os
import shutil

from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.distribute.backup import AtomicBackupAndRestore


class StepBackup(AtomicBackupAndRestore):
    """Saves every `save_freq` steps (atomically, on the chief only); restoring is `restore`'s job."""

    def __init__(self, backup_dir, save_freq, chief=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=False)
        self.chief = chief

    def on_train_begin(self, logs=None):  # restored by `restore` before fit, with the step count
        pass

    def _save_model(self):
        if self.chief:
            super()._save_model()

    def restore(self, model):
        """Loads the last complete backup, if any, into `model`; returns the number of steps done."""
        self._recover()
        if os.path.exists(self._weights_path):
            strategy = getattr(model, "distribute_strategy", None)  # TensorFlow backend: the model's strategy
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                model.load_weights(self._weights_path)
        return int(model.optimizer.iterations.numpy())


def fit_resumable(model, dataset, epochs, backup_dir, save_freq, chief=True, callbacks=(), **fit_kwargs):
    """Fits a compiled `model` for `epochs` over `dataset` (a finite, batched tf.data.Dataset),
    backing up every `save_freq` steps into `backup_dir`; after a crash, the same call resumes at
    the last backup and ends with the weights an uninterrupted run would have. Returns
    `(histories, resumed_from_step)`: the history dicts of the fit calls made (one, or two when
    resuming mid-epoch) and the number of steps the backup had done (0 on a fresh start).

    Callbacks start afresh on resume: EarlyStopping counts its patience, and ModelCheckpoint its
    best value, from the resumed step."""
    check_positive_int(save_freq, "save_freq", "fit_resumable")  # a number of steps
    per_epoch = int(dataset.cardinality().numpy())
    if per_epoch <= 0:
        raise ValueError(f"fit_resumable: dataset must be finite and non-empty (cardinality {per_epoch}); do not .repeat() it.")
    done = StepBackup(backup_dir, save_freq, chief).restore(model)
    epoch, offset = divmod(done, per_epoch)
    histories = []
    if offset and epoch < epochs:  # finish the interrupted epoch without replaying its first batches
        backup = StepBackup(backup_dir, save_freq, chief)
        fit = model.fit(dataset.skip(offset), initial_epoch=epoch, epochs=epoch + 1, callbacks=[backup, *callbacks], **fit_kwargs)
        histories.append(fit.history)
        epoch += 1
    if epoch < epochs:
        backup = StepBackup(backup_dir, save_freq, chief)
        fit = model.fit(dataset, initial_epoch=epoch, epochs=epochs, callbacks=[backup, *callbacks], **fit_kwargs)
        histories.append(fit.history)
    if chief:
        shutil.rmtree(backup_dir, ignore_errors=True)
    return histories, done
