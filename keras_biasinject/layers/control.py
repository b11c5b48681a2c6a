"""The control vector: checking it, centring it on the neutral point, and routing it.

A control is a float tensor whose last axis has `control_dim` entries. Its leading axes are the
leading axes of the layer's output that it varies over:

- `[control_dim]`: one control for the whole call;
- `[batch, control_dim]`: one control per example;
- `[batch, seq, control_dim]`: one control per token.

Layers never see a control they were not given. Inside a `control_scope(c)` block, a layer called
without `control=` uses `c`; outside any scope it uses the neutral control. The scope is how a control
reaches adapters spliced deep inside a model whose blocks call their projections with one argument
(KerasHub's transformer blocks do): the model enters the scope in its own `call`, inside the same
trace, so it works eagerly, under `tf.function` and under `jax.jit`. Every adapter kind reads its
control this way, in `ControlAdapter.call` (layers/adapter.py).

A model with several adapters (`inject` more than once) has one combined control: the adapters'
controls side by side, in injection order. Each adapter reads its own slice (`control_part`).
"""

import contextlib
import threading

import numpy as np
from keras import ops

from keras_biasinject.layers.checks import check_finite_control, describe, is_finite_number

_scopes = threading.local()


@contextlib.contextmanager
def control_scope(control, hoisted=None):
    """Makes `control` the control of every layer called inside the block without `control=`.

    `hoisted`: {id(layer): terms} that layers computed from this control once, before a loop that
    calls them many times (`generate`'s decoding loop: see `ControlAdapter.hoist`); a layer reads its
    own with `hoisted_terms`.

    Example:
    >>> with control_scope(c):          # c: [batch, control_dim]
    ...     y = backbone(inputs)        # every spliced adapter reads c
    """
    stack = getattr(_scopes, "stack", None)
    if stack is None:
        stack = _scopes.stack = []
    stack.append((control, hoisted))
    try:
        yield control
    finally:
        stack.pop()


def current_control():
    """The control of the innermost `control_scope`, or None outside any scope."""
    stack = getattr(_scopes, "stack", None)
    return stack[-1][0] if stack else None


def hoisted_terms(layer, control):
    """What `layer` computed from the innermost scope's control before the loop, when `control` is
    that very control (not one passed with `control=`); else None."""
    stack = getattr(_scopes, "stack", None)
    if not stack or stack[-1][1] is None or control is not stack[-1][0]:
        return None
    return stack[-1][1].get(id(layer))


def control_part(control, start, width):
    """`control[..., start:start + width]`: one adapter's part of a model's combined control (a model
    with several adapters concatenates their controls, in injection order)."""
    if isinstance(control, (list, tuple, float, int)):
        control = np.asarray(control, "float32")
    return control[..., start : start + width]


def check_neutral(neutral, control_dim, owner):
    """Returns `neutral` as a float or a list of `control_dim` floats, or raises ValueError."""
    scalar = isinstance(neutral, (int, float, np.integer, np.floating))
    array_like = isinstance(neutral, (list, tuple, np.ndarray))
    values = [neutral] if scalar else np.asarray(neutral, dtype=object).reshape(-1).tolist() if array_like else None
    if values is None or not all(is_finite_number(v) for v in values):
        raise ValueError(f"{owner}: `neutral` must be finite: a float or a list of floats, not a bool, NaN, inf or an "
                         f"integer beyond the float range (1.8e308). Got neutral={describe(neutral)}.")
    if not scalar and len(values) != control_dim:
        raise ValueError(
            f"{owner}: `neutral` has {len(values)} entries but control_dim={control_dim}. "
            f"Pass one float, or a list of {control_dim} floats. Got neutral={describe(neutral)}."
        )
    return float(neutral) if scalar else [float(v) for v in values]


def centred_control(control, neutral, control_dim, max_lead, dtype, owner):
    """Checks a control and returns `control - neutral` in `dtype`.

    `max_lead` is how many leading (batch-like) axes the layer's output has: a control may vary
    over at most that many. A concrete control (eager) with NaN or inf raises ValueError; a symbolic
    one (inside `tf.function` or `jax.jit`) cannot be checked here: `InjectedModel.fit`/`predict`
    check their data before tracing.
    """
    check_finite_control(control, owner)
    control = ops.convert_to_tensor(control)
    shape = tuple(control.shape)
    if len(shape) == 0 or len(shape) - 1 > max_lead:
        raise ValueError(
            f"{owner}: control has shape {shape}; expected [{control_dim}], "
            f"[batch, {control_dim}]" + (f" or [batch, seq, {control_dim}]" if max_lead > 1 else "")
            + ". Pass one control per example or per token."
        )
    if shape[-1] is not None and shape[-1] != control_dim:
        raise ValueError(
            f"{owner}: control has width {shape[-1]} on its last axis (shape {shape}), but the "
            f"layer was built with control_dim={control_dim}. Pass a control of shape "
            f"[batch, {control_dim}] or rebuild the layer with control_dim={shape[-1]}."
        )
    control = ops.cast(control, dtype)
    if not np.any(neutral):  # neutral 0 (the default): `c - 0` is `c` bit for bit, so the graph keeps no Sub per adapter
        return control
    return ops.subtract(control, ops.cast(ops.convert_to_tensor(neutral), dtype))


def align(tensor, lead, rank):
    """Inserts unit axes after the first `lead` axes of `tensor` until it has `rank` axes.

    Control-derived terms have the control's leading axes followed by feature axes; this makes a
    per-example term `[batch, F]` broadcast against an output `[batch, seq, F]`.
    """
    missing, trailing = rank - len(tensor.shape), tuple(tensor.shape[lead:])
    if missing > 1 and lead == 1 and None not in trailing:  # one reshape, not one expand_dims per axis (fewer graph ops)
        return ops.reshape(tensor, (-1,) + (1,) * missing + trailing)
    for _ in range(missing):
        tensor = ops.expand_dims(tensor, lead)
    return tensor


def control_term(centred, kernel, rank):
    """`(c - neutral) V` for `V` of shape `[control_dim, *features]`, aligned to an output of `rank` axes."""
    lead = len(centred.shape) - 1
    letters = "abcdefghij"
    lead_letters, feat_letters = letters[:lead], letters[lead : lead + len(kernel.shape) - 1]
    term = ops.einsum(f"{lead_letters}z,z{feat_letters}->{lead_letters}{feat_letters}", centred, kernel)
    return align(term, lead, rank)
