"""Guarded online self-tuning: a few adapter-only steps on feedback examples, kept only if the
held-out loss did not get worse by more than a threshold; otherwise every weight is rolled back.

The base weights never change (checked bit for bit after the steps with `FrozenSnapshot`, as in
every recipe run).
"""

import dataclasses
import math

import keras
import numpy as np

from keras_biasinject.rewrite.frozen import FrozenSnapshot
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import preprocessor_detached


@dataclasses.dataclass
class AdaptResult:
    accepted: bool  # True: the new weights stay (and a new export version is published)
    loss_before: float  # held-out loss before the steps
    loss_after: float  # held-out loss after the steps
    steps: int  # gradient steps taken
    reason: str  # why it was accepted or rolled back

    def to_dict(self):
        return dataclasses.asdict(self)


def _arrays(batch, what):
    """(inputs, labels, sample weights or None) of a JSON batch: named inputs plus `labels`."""
    if not isinstance(batch, dict) or "labels" not in batch:
        raise ValueError(f"{what} must be an object of named inputs plus `labels`. Got keys {sorted(batch) if isinstance(batch, dict) else batch!r}.")
    x = {k: np.asarray(v) for k, v in batch.items() if k not in ("labels", "sample_weight")}
    y = np.asarray(batch["labels"])
    w = None if batch.get("sample_weight") is None else np.asarray(batch["sample_weight"], "float32")
    sizes = {len(v) for v in x.values()} | {len(y)}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"{what}: inputs and labels must have the same, non-zero number of examples. Got sizes {sorted(sizes)}.")
    for k, v in x.items():
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise ValueError(f"{what}: input {k!r} has NaN or infinite values.")
    return x, y, w


def _check_settings(model, steps, learning_rate, max_loss_increase, max_steps):
    if not isinstance(model, InjectedModel):
        raise ValueError("adapt: the model has no adapters; self-tuning trains only adapter weights.")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise ValueError(f"adapt: `steps` must be an integer from 1 to {max_steps}. Got steps={steps!r}.")
    for name, value in (("learning_rate", learning_rate), ("max_loss_increase", max_loss_increase)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
            raise ValueError(f"adapt: `{name}` must be a non-negative finite number (learning_rate > 0). Got {name}={value!r}.")


def _fit(model, x, y, w, n, steps):
    """Trains `steps` full batches; returns None, or why training diverged (a trainable weight NaN or
    inf: `InjectedModel.fit` raises ValueError then, the weights are rolled back by the caller)."""
    try:
        model.fit(x, y, sample_weight=w, batch_size=n, epochs=steps, verbose=0, shuffle=False)
    except ValueError:
        bad = sum(not np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.trainable_weights)
        if not bad:
            raise  # not a divergence: a bug, kept as it is
        return f"{bad} adapter weight(s) became NaN or inf"
    return None


def guarded_adapt(model, examples, heldout, *, steps=10, learning_rate=1e-3, max_loss_increase=0.0, max_steps=100):
    """Trains `model`'s adapters on `examples` for `steps` full-batch steps; keeps the result only if
    the loss on `heldout` rose by at most `max_loss_increase` (relative). Returns an `AdaptResult`.

    Every argument is checked (ValueError) before the model is touched."""
    _check_settings(model, steps, learning_rate, max_loss_increase, max_steps)
    x, y, w = _arrays(examples, "examples")
    hx, hy, hw = _arrays(heldout, "heldout")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if getattr(model, "feedback_head", None) is not None:  # the model answers {"logits", "feedback"}: the labels are the logits'
        loss = {"logits": loss}
        y, hy = {"logits": y}, {"logits": hy}
        w, hw = (None if v is None else {"logits": v} for v in (w, hw))

    frozen = FrozenSnapshot(model)
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights]
    with preprocessor_detached(model):  # the examples are token ids already
        model._compile_metrics = None  # no metrics: a compile that names none keeps earlier ones (Keras)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=None, weighted_metrics=None)
        n, hn = len(next(iter(x.values()))), len(next(iter(hx.values())))  # full batches
        before = float(model.evaluate(hx, hy, sample_weight=hw, batch_size=hn, verbose=0, return_dict=True)["loss"])
        diverged = _fit(model, x, y, w, n, steps)
        after = math.nan if diverged else float(
            model.evaluate(hx, hy, sample_weight=hw, batch_size=hn, verbose=0, return_dict=True)["loss"])
        if frozen.changed(model):
            reason = "a frozen base weight changed; this is a bug, please report it"
        elif diverged:
            reason = f"training diverged: {diverged}"
        elif not np.isfinite(after):
            reason = f"the held-out loss became {after}"
        elif after > before * (1.0 + max_loss_increase):
            reason = f"held-out loss rose from {before:.6f} to {after:.6f}, over the allowed {100 * max_loss_increase:.2f}%"
        else:
            return AdaptResult(True, before, after, steps, f"held-out loss {before:.6f} -> {after:.6f}")
        for variable, value in zip(model.trainable_weights, saved):  # roll back, bit for bit
            variable.assign(value)
        return AdaptResult(False, before, after, steps, f"rolled back: {reason}")
