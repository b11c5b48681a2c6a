"""Argument checks shared by the whole package, with the message format of every error here:
"<owner>: `<name>` must be <what>. Got <name>=<value>."

This module imports nothing else of keras_biasinject, so every layer of the package may use it.
"""

import math

import numpy as np


def check_positive_int(value, name, owner, allow_none=False):
    """Returns `value` as an int, or raises ValueError; `None` passes when `allow_none`."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        what = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{owner}: `{name}` must be {what}. Got {name}={value!r}.")
    return int(value)


def check_positive_number(value, name, owner):
    """Returns `value` as a float if it is a finite number above zero, or raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{owner}: `{name}` must be a positive number. Got {name}={value!r}.")
    return float(value)
