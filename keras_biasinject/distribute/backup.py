"""`AtomicBackupAndRestore`: Keras' `BackupAndRestore` whose backup is never half-written.

Keras writes `latest.weights.h5` and then its metadata in place, so a kill or Ctrl-C during the
write leaves a torn backup that the next run fails to load (or loads with the wrong epoch). Here
both files are written with `keras_biasinject.atomic.atomic_dir` and swapped in by renames: at any
moment `state/` (or, between the two renames, the old copy that `recover` puts back) holds a
complete backup, and a partial folder is never read.
"""

import os

import keras

from keras_biasinject.atomic import atomic_dir, recover

WEIGHTS, METADATA = "latest.weights.h5", "training_metadata.json"


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint, double_checkpoint=False)
        self._state = os.path.join(backup_dir, "state")
        self._weights_path = os.path.join(self._state, WEIGHTS)
        self._training_metadata_path = os.path.join(self._state, METADATA)

    def _recover(self):
        recover(self._state)

    def _load_model(self):
        self._recover()
        super()._load_model()

    def _save_model(self):
        real = self._weights_path, self._training_metadata_path
        with atomic_dir(self._state, overwrite=True) as partial:
            self._weights_path = os.path.join(partial, WEIGHTS)
            self._training_metadata_path = os.path.join(partial, METADATA)
            try:
                keras.callbacks.BackupAndRestore._save_model(self)
            finally:
                self._weights_path, self._training_metadata_path = real
