"""`AtomicBackupAndRestore`: Keras' `BackupAndRestore` whose backup is never half-written.

Keras writes `latest.weights.h5` and then its metadata in place, so a kill or Ctrl-C during the
write leaves a torn backup that the next run fails to load (or loads with the wrong epoch). Here
both files are written into `state.partial/` and swapped in by renames: at any moment `state/` (or,
between the two renames, `state.old/`) holds a complete backup, and a partial folder is ignored.
"""

import os
import shutil

import keras


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint, double_checkpoint=False)
        self._state = os.path.join(backup_dir, "state")
        self._weights_path = os.path.join(self._state, "latest.weights.h5")
        self._training_metadata_path = os.path.join(self._state, "training_metadata.json")

    def _recover(self):
        old = self._state + ".old"
        if not os.path.isdir(self._state) and os.path.isdir(old):  # killed between the two renames
            os.replace(old, self._state)
        shutil.rmtree(self._state + ".partial", ignore_errors=True)  # killed while writing: ignore it
        shutil.rmtree(old, ignore_errors=True)

    def _load_model(self):
        self._recover()
        super()._load_model()

    def _save_model(self):
        partial, old = self._state + ".partial", self._state + ".old"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        real = self._weights_path, self._training_metadata_path
        self._weights_path = os.path.join(partial, "latest.weights.h5")
        self._training_metadata_path = os.path.join(partial, "training_metadata.json")
        try:
            keras.callbacks.BackupAndRestore._save_model(self)
        finally:
            self._weights_path, self._training_metadata_path = real
        for name in os.listdir(partial):
            with open(os.path.join(partial, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(self._state):
            os.replace(self._state, old)
        os.replace(partial, self._state)
        shutil.rmtree(old, ignore_errors=True)
