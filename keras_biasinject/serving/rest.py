"""TF Serving's REST format, checked: a predict body -> the tensors a signature takes, its outputs
-> the answer; a session feedback body -> its feedback vector; an `:adapt` batch -> its arrays.

Also the `Limits` and `AdaptPolicy` those checks enforce, and `BadRequest`, the error each check
raises: the server answers it with its status (a 4xx) and `{"error": message}`. Every value is
checked here, before TensorFlow sees it: no bad input reaches the model or the store.
"""

import dataclasses
import math
import re

import numpy as np
import tensorflow as tf

FLOAT32_MAX = float(np.finfo(np.float32).max)
SESSION_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")  # RFC 3986 unreserved characters plus ":" and "@"


@dataclasses.dataclass
class Limits:
    """What one request (and the session store) may hold; beyond it the server answers a 4xx."""

    max_body_bytes: int = 1 << 20  # request bodies above this get 413 (counted while they stream in)
    max_batch: int = 64  # examples per predict (and :adapt) request
    max_sequence: int = 1024  # tokens per example
    max_sessions: int = 100_000  # sessions the store may hold (expired ones are dropped to make room)
    max_clock_skew: float = 300.0  # a stored timestamp may lie this many seconds ahead of the server's clock
    session_ttl: float = 30 * 86400.0  # a session idle this long (server time) is gone; 0: sessions never expire

    def __post_init__(self):
        for name in ("max_body_bytes", "max_batch", "max_sequence", "max_sessions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"serve: {flag} must be an integer >= 1. Got {value!r}.")
        for name in ("max_clock_skew", "session_ttl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"serve: {flag} must be a finite number of seconds >= 0. Got {value!r}.")


@dataclasses.dataclass
class AdaptPolicy:
    """What `:adapt` may do (`kbi serve --allow-adapt ...`): the guard is the server's, never the request's."""

    enabled: bool = False  # off: `:adapt` answers 403
    heldout: object = None  # the held-out batch (inputs plus `labels`) read from `--adapt-heldout` at start
    max_loss_increase: float = 0.0  # relative held-out loss increase a published version may have
    max_steps: int = 20  # a request's `steps` may be at most this (default: min(10, max_steps))
    max_learning_rate: float = 1e-2  # a request's `learning_rate` may be at most this (default: min(1e-3, this))
    keep_versions: int = 5  # after a publish, older numeric version folders beyond this many are deleted

    def __post_init__(self):
        if self.enabled and self.heldout is None:
            raise ValueError("serve --allow-adapt needs --adapt-heldout FILE.json: the held-out set is the server's.")
        for name in ("max_loss_increase", "max_learning_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"serve: adapt `{name}` must be a finite number >= 0. Got {value!r}.")
        for name in ("max_steps", "keep_versions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve: adapt `{name}` must be an integer >= 1. Got {value!r}.")


class BadRequest(Exception):
    """A request the server refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Unauthorized(BadRequest):
    """A state-changing request without the server's bearer token: 401 with `WWW-Authenticate: Bearer`."""

    def __init__(self, message):
        super().__init__(message, 401)


def shown(value, limit=80):
    """`value`'s repr, cut to `limit` characters (a 5,000-digit number is not echoed whole)."""
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit
        text = f"<an integer of over {len(str(2 ** 64))} digits>"
    return text if len(text) <= limit else text[:limit] + "..."


def finite_number(value, what, bound=math.inf):
    """`value` as a float if it is a JSON number (not a bool) with |value| <= `bound` (finite by
    default; `FLOAT32_MAX` for what float32 state holds); BadRequest naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what} must be a finite number. Got {shown(value)}.")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer
        number = math.inf
    if not math.isfinite(number) or abs(number) > bound:
        within = "" if bound == math.inf else f" within +-{bound:.6g} (float32)"
        raise BadRequest(f"{what} must be a finite number{within}. Got {shown(value)}.")
    return number


def text_value(value, what):
    """`value` if it is a string; BadRequest naming `what` otherwise."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string. Got {shown(value)}.")
    return value


def session_id(value, what="session id"):
    """`value` if it is a valid session id: 1 to 128 of `A-Z a-z 0-9 . _ ~ : @ -`; BadRequest otherwise."""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise BadRequest(f"{what} must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ : @ - (sent unencoded). "
                         f"Got {shown(value)}.")
    return value


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


def integer_range(name, dtype, vocabulary_size=None):
    """[low, high) an integer input may hold: token ids [0, vocabulary_size) when it is known, other
    integer inputs (masks, segment ids) [0, the dtype's maximum]."""
    high = int(np.iinfo(dtype.as_numpy_dtype).max) + 1 if dtype.is_integer else 2
    if vocabulary_size is not None and "token_ids" in name:
        high = min(high, int(vocabulary_size))
    return 0, high


def finite_floats(array):
    """Whether every number in the object array `array` is finite within float32's range."""
    try:
        floats = array.astype(np.float64)
    except OverflowError:  # a 400-digit integer
        return False
    return bool(np.all(np.isfinite(floats)) and np.all(np.abs(floats) <= FLOAT32_MAX))


def checked_array(name, value, dtype, bounds=None):
    """`value` (nested JSON lists) as a numpy array of `dtype`, every element checked first: strings
    for a string dtype, integers within `bounds` ([low, high)) for an integer or bool one (no floats,
    no bools), numbers within float32 for a float one. BadRequest naming `name` otherwise."""
    try:
        array = np.asarray(value, dtype=object)
    except (ValueError, TypeError, RecursionError):
        array = None
    if array is None or any(isinstance(v, (list, dict)) for v in array.flat):
        raise BadRequest(f"input {name!r}: values must be {dtype.name} in a rectangular array (rows of equal length).")
    if dtype == tf.string:
        kind, fits = "strings", lambda v: isinstance(v, str)
    elif dtype.is_integer or dtype == tf.bool:
        kind, fits = "integers", lambda v: type(v) is int  # not bool, not 1.5
    else:
        kind, fits = "numbers", lambda v: type(v) in (int, float)
    bad = next((v for v in array.flat if not fits(v)), fits)
    if bad is not fits:
        raise BadRequest(f"input {name!r}: values must be {kind} ({dtype.name}). Got {shown(bad)}.")
    if kind == "integers" and array.size:
        low, high = bounds or integer_range(name, dtype)
        bad = [v for v in (min(array.flat), max(array.flat)) if not low <= v < high]
        if bad:
            raise BadRequest(f"input {name!r}: {shown(bad[0])} is out of range; values must lie in [{low}, {high}).")
    if kind == "numbers" and not finite_floats(array):
        raise BadRequest(f"input {name!r}: NaN or infinite values, or values beyond float32's range (+-{FLOAT32_MAX:.6g}).")
    return array.astype(object if dtype == tf.string else dtype.as_numpy_dtype)


def input_tensor(name, value, spec, limits, vocabulary_size=None):
    """The tensor for input `name`: of `spec`'s dtype and shape, finite, within `limits`; integer
    inputs within `integer_range` (token ids below `vocabulary_size` when it is known)."""
    array = checked_array(name, value, spec.dtype, integer_range(name, spec.dtype, vocabulary_size))
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


def signature_tensors(signature, specs, columns, limits, vocabulary_size=None):
    """{input name: tensor} for `signature` (input specs `specs`) from `columns`: every input there and
    none unknown, one batch size, and token inputs of one shape (ids below `vocabulary_size`)."""
    unknown = sorted(k[:60] for k in set(columns) - set(specs))
    missing = sorted(set(specs) - set(columns))
    if unknown or missing:
        raise BadRequest(f"signature {signature!r} takes inputs {sorted(specs)}; missing {missing}, unknown {unknown}.")
    tensors = {k: input_tensor(k, columns[k], specs[k], limits, vocabulary_size) for k in specs}
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
            raise BadRequest(f"`feedback` must be a list of {width} numbers. Got {shown(values)}.")
        return [finite_number(v, "each feedback value", FLOAT32_MAX) for v in values]
    if "rating" in body:
        if width != 1:
            raise BadRequest(f"`rating` is one number; this export takes feedback of width {width}: send `feedback`.")
        return [finite_number(body["rating"], "`rating`", FLOAT32_MAX)]
    raise BadRequest("the body needs `feedback` (a list) or `rating` (a number).")


def adapt_batch(batch, what, specs, labels_spec, limits, vocabulary_size=None):
    """An `:adapt` batch (the inputs `specs` names plus `labels`, `sample_weight` optional) as numpy
    arrays ({inputs}, labels, weights or None), every value checked before TensorFlow sees it.
    `labels_spec` is (number of classes, rank): labels are integers in [0, classes), shaped as the
    first `rank` dimensions of the inputs (a classifier: one per example; an LM: one per token)."""
    if not isinstance(batch, dict) or "labels" not in batch:
        raise BadRequest(f"`{what}` must be an object of named inputs plus `labels`. Got {shown(batch)}.")
    names = set(batch) - {"labels", "sample_weight"}
    unknown, missing = sorted(k[:60] for k in names - set(specs)), sorted(set(specs) - names)
    if unknown or missing:
        raise BadRequest(f"`{what}` takes inputs {sorted(specs)} plus `labels` (and `sample_weight`); "
                         f"missing {missing}, unknown {unknown}.")
    x = {k: input_tensor(f"{what}.{k}", batch[k], specs[k], limits, vocabulary_size).numpy() for k in specs}
    classes, rank = labels_spec
    y = checked_array(f"{what}.labels", batch["labels"], tf.int32, (0, classes))
    tokens = [v.shape for v in x.values() if v.dtype.kind in "iub"] or [v.shape for v in x.values()]  # token ids first
    shape = max(tokens, key=len)[:rank]
    if y.shape != shape or any(len(v) != shape[0] for v in x.values()):
        raise BadRequest(f"`{what}.labels` must have shape {list(shape)} (the inputs' first {rank} dimension(s)), "
                         f"and every input {shape[0]} examples. Got labels of shape {list(y.shape)}.")
    if batch.get("sample_weight") is None:
        return x, y, None
    w = checked_array(f"{what}.sample_weight", batch["sample_weight"], tf.float32)
    if w.shape not in (y.shape, y.shape[:1]) or np.any(w < 0):
        raise BadRequest(f"`{what}.sample_weight` must be non-negative numbers of shape {list(y.shape)} or "
                         f"{list(y.shape[:1])}. Got shape {list(w.shape)}, minimum {shown(float(w.min()) if w.size else None)}.")
    return x, y, np.broadcast_to(w.reshape(w.shape + (1,) * (y.ndim - w.ndim)), y.shape)  # one per example: each of its labels
