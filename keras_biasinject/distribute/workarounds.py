"""Two small fixes that let Keras 3 `fit` run under `tf.distribute.MultiWorkerMirroredStrategy`.

- keras-team/keras#20329 (https://github.com/keras-team/keras/issues/20329): with dict inputs,
  `fit` fails with "Attempt to convert a value ({'token_ids': PerReplica...}) ... to a Tensor".
  Root cause: `TensorFlowTrainer._maybe_symbolic_build` takes the first distributed batch and
  calls `strategy.reduce("MEAN", batch, axis=None)` on the whole nested dict; the multi-worker
  strategy's `reduce` converts its argument to one tensor, which a dict is not. Fix: take each
  leaf's value on the first replica (the batch is only used for its shapes and dtypes, to build
  the model; a mean would also fail on a bool padding mask, under MirroredStrategy too).
- tensorflow/tensorflow#72388 (https://github.com/tensorflow/tensorflow/issues/72388): "Invalid
  reduction dimension 0 for input with 0 dimensions". Root cause: Keras' `reduce_per_replica`
  reduces every step output (the scalar loss and metrics) in multi-worker mode with
  `strategy.reduce("MEAN", v, axis=0)`, and a scalar has no axis 0. Fix: `axis=None` for scalars
  (the mean over replicas, which is what the non-multi-worker path computes).

Each fix switches itself off once upstream changes the code it fixes: it is applied only while the
installed Keras still holds the exact faulty call (checked in its source), so an upgrade that
fixes the bug (or rewrites that code) leaves Keras untouched. `keras_fixes()` is a context manager
that patches for the duration of a `fit` and restores Keras on exit. Single-device runs never reach
the patched branches; MirroredStrategy reaches only the first, which builds the same model.
"""

import contextlib
import inspect

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer

# The faulty calls, as the Keras source spells them (whitespace removed before matching).
_BUG_20329 = 'self.distribute_strategy.reduce("MEAN",maybe_distributed_data_batch,axis=None,)'
_BUG_72388 = 'strategy.reduce("MEAN",v,axis=0)'


def _source(obj):
    try:
        return "".join(inspect.getsource(obj).split())
    except (OSError, TypeError):  # no source (e.g. a compiled install): cannot tell, do not patch
        return ""


def needs_fix_20329():
    """True while the installed Keras still reduces a whole nested batch at once (#20329)."""
    return _BUG_20329 in _source(tf_trainer.TensorFlowTrainer._maybe_symbolic_build)


def needs_fix_72388():
    """True while the installed Keras still reduces scalar step outputs along axis 0 (#72388)."""
    return _BUG_72388 in _source(tf_trainer.reduce_per_replica)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras' own method with the reduction made leaf by leaf (keras-team/keras#20329).
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            leaves = tree.flatten(batch)
            if leaves and all(isinstance(x, tf.distribute.DistributedValues) for x in leaves):
                # One replica's value per leaf: the shapes and dtypes a mean would have, and no
                # mean of bool or int leaves (a padding mask), which AddN refuses.
                local = self.distribute_strategy.experimental_local_results
                batch = tree.map_structure(lambda x: local(x)[0], batch)
            data_batch = batch
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(original):
    def reduce_per_replica(values, strategy, reduction):
        # Scalars (loss, metrics) reduce over replicas with axis=None (tensorflow/tensorflow#72388).
        if not tf_trainer._collective_all_reduce_multi_worker(strategy) or reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)

        def reduce(v):
            if v.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return tree.map_structure(reduce, values)

    return reduce_per_replica


@contextlib.contextmanager
def keras_fixes():
    """Patches Keras' TensorFlow trainer for multi-worker `fit` while inside; restores it on exit.

    Example:
    >>> with strategy.scope():
    ...     model = build_and_compile()
    >>> with keras_fixes():
    ...     model.fit(dataset, epochs=2)
    """
    saved = []
    if needs_fix_20329():
        saved.append((tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build", tf_trainer.TensorFlowTrainer.__dict__["_maybe_symbolic_build"]))
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    if needs_fix_72388():
        saved.append((tf_trainer, "reduce_per_replica", tf_trainer.reduce_per_replica))
        tf_trainer.reduce_per_replica = _reduce_per_replica(tf_trainer.reduce_per_replica)
    try:
        yield [name for _, name, _ in saved]
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
