"""Argument checks shared by the whole package, with the message format of every error here:
"<owner>: `<name>` must be <what>. Got <name>=<value>."

This module imports nothing else of keras_biasinject, so every layer of the package may use it.
"""

import math

import keras
import numpy as np
from keras import ops

keras_tensor_type = getattr(keras, "KerasTensor", None)
_BIG = 10**20  # integers from this size on are described by their number of digits, not printed


def describe(value):
    """`value` for an error message, shortened: a huge integer as "an integer of 1,000 digits" (Python
    cannot even print one of more than 4,300), anything else as its `repr`, cut at 80 characters."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)) >= _BIG:
        try:
            return f"an integer of {len(str(abs(int(value)))):,} digits"
        except ValueError:  # beyond Python's limit on printing integers
            return f"an integer of about {int(abs(int(value)).bit_length() * math.log10(2)) + 1:,} digits"
    try:
        text = repr(value)
    except ValueError:  # a container holding an integer too long to print
        return f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def is_finite_number(value):
    """True for an int, float or numpy number (not a bool) that is finite as a float: NaN, inf and
    integers beyond the float range (about 1.8e308, where `float()` raises OverflowError) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_positive_int(value, name, owner, allow_none=False):
    """Returns `value` as an int, or raises ValueError; `None` passes when `allow_none`."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        what = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{owner}: `{name}` must be {what}. Got {name}={describe(value)}.")
    return int(value)


def check_positive_number(value, name, owner, allow_none=False):
    """Returns `value` as a float if it is a finite number above zero, or raises ValueError; `None`
    passes when `allow_none`."""
    if allow_none and value is None:
        return None
    if not (is_finite_number(value) and value > 0):
        what = "a positive number" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {what}. Got {name}={describe(value)}; give a finite value above "
                         "zero (and below 1.8e308, the float range).")
    return float(value)


def check_index(value, name, owner):
    """Returns `value` as an int (Python or numpy integer, any sign), or raises ValueError; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}: `{name}` must be an integer. Got {name}={describe(value)}.")
    return int(value)


def concrete_values(tensor):
    """`tensor`'s values as a numpy array, or None when it has none yet.

    Concrete values: numpy arrays, Python numbers and lists, eager tensors (TensorFlow eager, JAX
    outside `jit`, torch). A symbolic tensor (a `KerasTensor` while a functional model is built, a
    graph tensor inside `tf.function`, a tracer inside `jax.jit`) has no values, so checks built on
    this are a no-op while tracing: every backend raises on converting one, which is how it is told
    apart without backend-specific code.
    """
    if keras_tensor_type is not None and isinstance(tensor, keras_tensor_type):
        return None
    if isinstance(tensor, (np.ndarray, np.generic, int, float, list, tuple)):
        return np.asarray(tensor)
    try:
        return np.asarray(ops.convert_to_numpy(tensor))
    except Exception:  # symbolic (graph tensor or tracer): no values to check
        return None


def check_finite_control(control, owner):
    """Raises ValueError if `control` is concrete and holds NaN or inf (see `concrete_values`)."""
    values = concrete_values(control)
    if values is None or values.dtype.kind not in "fiu" or np.all(np.isfinite(values)):
        return
    raise ValueError(
        f"{owner}: the control contains NaN or inf (got {np.array2string(values.reshape(-1)[:8], threshold=8)}"
        f"{' ...' if values.size > 8 else ''}). A non-finite control makes every adapted output NaN and, "
        "in training, every adapter weight: pass finite control values (drop or clip the bad rows)."
    )
