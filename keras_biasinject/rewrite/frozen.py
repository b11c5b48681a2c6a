"""Which weights train: parameter counts, and a bit-for-bit check that the frozen base did not move."""

import keras
import numpy as np


def count_params(weights):
    """The number of scalars in `weights` (a list of variables)."""
    return int(sum(np.prod(w.shape) for w in weights))


class FrozenSnapshot:
    """A copy of every non-trainable weight of `model`, taken now; `changed(model)` lists the paths of
    those whose value is no longer identical (`==`, not close).

    >>> frozen = FrozenSnapshot(model); model.fit(...); assert not frozen.changed(model)
    """

    def __init__(self, model):
        self._values = {id(v): np.array(keras.ops.convert_to_numpy(v)) for v in model.weights if not v.trainable}

    def changed(self, model):
        return [
            v.path for v in model.weights
            if id(v) in self._values and not np.array_equal(keras.ops.convert_to_numpy(v), self._values[id(v)])
        ]
