"""TF Serving's REST format, checked: a predict body -> the tensors a signature takes, its outputs
-> the answer; a session feedback body -> its feedback vector.

Also the `Limits` those checks enforce, and `BadRequest`, the error each check raises: the server
answers it with its status (a 4xx) and `{"error": message}`.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Limits:
    """What one request (and the session store) may hold; beyond it the server answers a 4xx."""

    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    max_batch: int = 64  # examples per predict request
    max_sequence: int = 1024  # tokens per example
    max_sessions: int = 100_000  # sessions the store may hold


class BadRequest(Exception):
    """A request the server refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def finite_number(value, what):
    """`value` as a float if it is a finite JSON number (not a bool); BadRequest naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number. Got {value!r}.")
    return float(value)


def input_columns(body, specs):
    """Predict body -> ({input name: list}, row format?): `instances` (rows) or `inputs` (columns)."""
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest("`instances` must be a non-empty list.")
        if len(specs) == 1 and not isinstance(rows[0], dict):
            return {next(iter(specs)): rows}, True
        if not all(isinstance(r, dict) for r in rows):
            raise BadRequest("each instance must be an object of named inputs.")
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise BadRequest("all instances must have the same inputs.")
        return {k: [r[k] for r in rows] for k in keys}, True
    if "inputs" in body:
        inputs = body["inputs"]
        if len(specs) == 1 and not isinstance(inputs, dict):
            return {next(iter(specs)): inputs}, False
        if not isinstance(inputs, dict):
            raise BadRequest("`inputs` must be an object of named, batched inputs.")
        return dict(inputs), False
    raise BadRequest("the body needs `instances` (rows) or `inputs` (columns), as in TF Serving's predict API.")


def input_tensor(name, value, spec, limits):
    """The tensor for input `name`: of `spec`'s dtype and shape, finite, within `limits`."""
    try:
        array = np.asarray(value, dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
    except (ValueError, TypeError):
        raise BadRequest(f"input {name!r}: values must be {spec.dtype.name} in a rectangular array (rows of equal length).") from None
    if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
        want = [-1 if d is None else d for d in spec.shape]
        raise BadRequest(f"input {name!r}: shape {list(array.shape)} does not fit {want} (-1: any).")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise BadRequest(f"input {name!r}: NaN or infinite values.")
    if array.ndim >= 1 and array.shape[0] > limits.max_batch:
        raise BadRequest(f"input {name!r}: batch {array.shape[0]} is over the limit of {limits.max_batch}.")
    if array.ndim >= 2 and spec.dtype.is_integer and array.shape[1] > limits.max_sequence:
        raise BadRequest(f"input {name!r}: sequence length {array.shape[1]} is over the limit of {limits.max_sequence}.")
    return tf.constant(array, spec.dtype)


def signature_tensors(signature, specs, columns, limits):
    """{input name: tensor} for `signature` (input specs `specs`) from `columns`: every input there and
    none unknown, one batch size, and token inputs of one shape."""
    unknown = sorted(set(columns) - set(specs))
    missing = sorted(set(specs) - set(columns))
    if unknown or missing:
        raise BadRequest(f"signature {signature!r} takes inputs {sorted(specs)}; missing {missing}, unknown {unknown}.")
    tensors = {k: input_tensor(k, columns[k], specs[k], limits) for k in specs}
    batches = {int(t.shape[0]) for t in tensors.values() if t.shape.rank}
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}.")
    token_shapes = {k: t.shape.as_list() for k, t in tensors.items() if t.dtype.is_integer and t.shape.rank >= 2}
    if len({tuple(v) for v in token_shapes.values()}) > 1:  # the model would broadcast them silently
        raise BadRequest(f"token inputs disagree on their shapes: {token_shapes}.")
    return tensors


def predict_answer(outputs, rows):
    """A signature's outputs ({name: batched list}) in the request's format: `predictions` (one entry
    per example) for a row request, `outputs` (columns; the bare list when there is one) otherwise."""
    if rows:
        keys = sorted(outputs)
        n = len(outputs[keys[0]])
        predictions = [outputs[keys[0]][i] if len(keys) == 1 else {k: outputs[k][i] for k in keys} for i in range(n)]
        return {"predictions": predictions}
    return {"outputs": outputs if len(outputs) > 1 else next(iter(outputs.values()))}


def feedback_values(body, width):
    """The feedback vector a session feedback body gives: `feedback` (a list of `width` numbers) or,
    when `width` is 1, `rating` (one number)."""
    if "feedback" in body:
        values = body["feedback"]
        if not isinstance(values, list) or len(values) != width:
            raise BadRequest(f"`feedback` must be a list of {width} numbers. Got {values!r}.")
        return [finite_number(v, "each feedback value") for v in values]
    if "rating" in body:
        if width != 1:
            raise BadRequest(f"`rating` is one number; this export takes feedback of width {width}: send `feedback`.")
        return [finite_number(body["rating"], "`rating`")]
    raise BadRequest("the body needs `feedback` (a list) or `rating` (a number).")
