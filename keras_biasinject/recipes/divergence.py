"""Stopping a recipe's training at the first non-finite loss or weight, with an error that says where.

`NonFiniteGuard` is Keras' `TerminateOnNaN` (it stops `fit` after the first batch whose loss is NaN
or inf) that also remembers where, and, when `fit` ends, checks every trainable weight and raises
`TrainingDiverged`. The runner then writes nothing of that method: no adapter, no report row, and
its backup is removed so that the next run starts the method afresh instead of resuming NaN weights.
"""

import math

import keras
import numpy as np


class TrainingDiverged(ValueError):
    """A method's training reached a NaN or inf loss or weight."""


class NonFiniteGuard(keras.callbacks.TerminateOnNaN):
    """`TerminateOnNaN` that raises `TrainingDiverged` at the end of `fit`, naming `method`, the epoch
    and batch of the first non-finite loss (1-based) and the weights that are NaN or inf.

    Place it last in the callbacks, so that the others (backups, early stopping) end first."""

    def __init__(self, method, learning_rate):
        super().__init__()
        self.method = method
        self.learning_rate = learning_rate
        self.epoch = 0
        self.first_bad = None  # (epoch, batch, loss) of the first non-finite loss

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and self.first_bad is None and not math.isfinite(float(np.asarray(loss))):
            self.first_bad = (self.epoch + 1, batch + 1, float(np.asarray(loss)))
        super().on_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        bad = [w.path for w in self.model.trainable_weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))]
        if self.first_bad is None and not bad:
            return
        if self.first_bad is not None:
            epoch, batch, loss = self.first_bad
            where = f"the loss became {loss} at epoch {epoch}, batch {batch}"
        else:
            where = "the loss stayed finite but trainable weights did not"
        if bad:
            where += f"; {len(bad)} trainable weight(s) are NaN or inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
        raise TrainingDiverged(
            f"{self.method}: training diverged: {where}. Likely causes: the "
            f"learning rate ({self.learning_rate:g}) is too high, or the data or the control holds NaN/inf. Nothing of "
            "this method was kept (no adapter, no report row); lower the learning rate or fix the data and run again."
        )
