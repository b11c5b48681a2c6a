"""The serving loop: a predict request that names a session and asks for `"loop": "self"` moves that
session by the model's own reading of its answer (the export's feedback head).

As the library's `FeedbackLoop`: the request runs with the session's control at its timestamp; the
reading `r` is the mean over the request's rows of the head's pooled reading (`[feedback_dim]`);
the session then gets `target - r` (given a target) or `r` through the export's `feedback_step`
(decay since its last update, then add). A NaN or infinite reading changes nothing. External
ratings (`POST /v1/sessions/<id>/feedback`) are other updates of the same state, so they add up.

This module holds the checks (every one runs before the model does) and the arithmetic;
`SessionServer.predict_in_loop` (app.py) runs the request and stores the update.
"""

import dataclasses
import math

import numpy as np

from keras_biasinject.serving.rest import BadRequest, finite_number

MODES = ("off", "self")  # "self": the model's own reading updates the session the request names
SIGNATURES = ("serve", "generate")  # the signatures whose `control` input the session's control fills


@dataclasses.dataclass
class LoopSettings:
    """The server's defaults for requests that leave out `loop` or `target` (`kbi serve --loop`, `--loop-target`)."""

    mode: str = "off"  # "self": every predict naming a session updates it; "off": only those that say "loop": "self"
    target: object = None  # a number or list: steer the reading towards it (feedback = target - r); None: feedback = r

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"serve: `loop` must be one of {list(MODES)}. Got loop={self.mode!r}.")


@dataclasses.dataclass
class LoopRequest:
    """A checked loop request: which session, at what time, steered towards what."""

    session_id: str  # the session the reading updates
    at: float  # the request's time (seconds): the session's control is decayed to it, the update stamped with it
    target: list  # `feedback_dim` floats inside the head's range, or None (the reading itself is the feedback)


class SessionMoved(Exception):
    """The session was updated between reading its control and storing the loop's update."""


def check_loop_export(export):
    """The export's feedback head (its metadata dict) if a loop can run on it: it keeps sessions, has a
    head, and the head's width is `feedback_step`'s; BadRequest otherwise."""
    if export.control_dim is None:
        raise BadRequest("this export has no feedback_step signature, so it keeps no sessions for a loop to update. "
                         "Export with `kbi export ... --feedback-half-life SECONDS` (or `feedback=DecayFeedback(...)`).")
    head = export.head
    if head is None:
        raise BadRequest("this export has no feedback head, so the model gives no reading for `\"loop\": \"self\"`. "
                         "Export a model with `add_feedback_head(model, FeedbackHead(...))` (and train the head), "
                         "or send `\"loop\": \"off\"`.")
    if head["feedback_dim"] != export.feedback_dim:
        raise BadRequest(f"this export's feedback head reads {head['feedback_dim']} value(s), but its feedback_step takes "
                         f"feedback of width {export.feedback_dim}. Export again with "
                         f"`DecayFeedback(..., feedback_dim={head['feedback_dim']})`.")
    return head


def reading_range(head):
    """(low, high): the open interval the head's readings lie in (infinite sides for a linear head)."""
    low, high = head["reading_range"]
    return (-math.inf if low is None else low), (math.inf if high is None else high)


def check_target(value, head, what="`target`"):
    """`value` (a number, or a list of `feedback_dim` numbers) as a list of floats strictly inside the
    head's reading range; BadRequest naming `what` otherwise."""
    width = head["feedback_dim"]
    values = [value] if width == 1 and not isinstance(value, (list, tuple)) else value
    if not isinstance(values, (list, tuple)) or len(values) != width:
        one = "a number or " if width == 1 else ""
        raise BadRequest(f"{what} must be {one}a list of {width} number(s), one per feedback value the head reads. "
                         f"Got {value!r}.")
    values = [finite_number(v, what) for v in values]
    low, high = reading_range(head)
    if not all(low < v < high for v in values):
        raise BadRequest(f"{what} {values} lies outside the feedback head's reading range ({low}, {high}) "
                         f"({head['activation']} readings never reach it): choose a target inside it.")
    return values


def check_settings(export, settings):
    """`settings` (the server's defaults) checked against `export` at start; ValueError, which `kbi
    serve` reports before it binds, otherwise. Returns them with the target as a list of floats."""
    if settings.mode == "off" and settings.target is None:
        return settings
    try:
        head = check_loop_export(export)
        target = None if settings.target is None else check_target(settings.target, head, "--loop-target")
    except BadRequest as error:
        raise ValueError(f"serve --loop {settings.mode}: {error}") from None
    return LoopSettings(settings.mode, target)


def loop_request(body, settings, export, signature, specs, columns, clock):
    """The `LoopRequest` a predict body asks for, or None (no loop). Every check runs here, before the
    model: `loop` is "self" or "off"; a loop names a session, on `serve` or `generate`, of an export with
    sessions and a head, and leaves `control` to the session; the target fits the head."""
    mode = body.get("loop", settings.mode)
    if mode not in MODES:
        raise BadRequest(f"`loop` must be one of {list(MODES)}: \"self\" updates the session from the model's own "
                         f"reading, \"off\" does not. Got loop={mode!r}.")
    if mode == "off" or ("session" not in body and "loop" not in body):  # a server default applies to sessions only
        if "target" in body:
            raise BadRequest("`target` steers the serving loop: send it with `\"loop\": \"self\"` and a `session`, or leave it out.")
        return None
    if "session" not in body:
        raise BadRequest("`\"loop\": \"self\"` updates a session from the model's reading: name it "
                         "(`\"session\": \"alice\"`), or send `\"loop\": \"off\"`.")
    if signature not in SIGNATURES:
        raise BadRequest(f"the loop runs the session's control through {list(SIGNATURES)}; signature_name {signature!r} "
                         "takes none. Use one of those, or send `\"loop\": \"off\"`.")
    head = check_loop_export(export)
    if "control" not in specs:
        raise BadRequest(f"signature {signature!r} of this export has no `control` input (a control was merged at export), "
                         "so a session's state cannot steer it. Export without `--control` to run the loop.")
    if "control" in columns:
        raise BadRequest("a loop request runs with its session's control: leave `control` out of the inputs, "
                         "or send `\"loop\": \"off\"` to run with your own.")
    target = check_target(body["target"], head) if "target" in body else settings.target
    at = finite_number(body.get("timestamp", clock()), "`timestamp`")
    return LoopRequest(str(body["session"]), at, target)


def mean_reading(outputs, signature):
    """`r`: the mean over the request's rows of the head's pooled reading, `[feedback_dim]` float32."""
    if "feedback" not in outputs:
        raise BadRequest(f"signature {signature!r} of this export returns no `feedback`; export the model again with "
                         "this package's export_saved_model, which adds it for a model with a feedback head.")
    return np.mean(outputs["feedback"], axis=0, dtype=np.float32)  # (B, F) -> (F,)


def self_feedback(reading, target):
    """What the reading feeds back: `target - r` when steering towards a target, `r` otherwise (float32)."""
    return reading if target is None else np.asarray(target, np.float32) - reading
