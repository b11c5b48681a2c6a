"""`FeedbackLoop`: one session of the closed loop, in the library.

The model generates with the session's current control; its feedback head reads what it produced;
the reading (or the error `target - reading`) and any external ratings step a `DecayFeedback` state
that becomes the next control and fades with the half-life. With a target, the state is a leaky
integral controller: it moves the control until the outputs read as the target. Time is explicit
(`at=`), so a session replays exactly.
"""

import dataclasses
import math
import warnings
from typing import Optional

import numpy as np

MODES = ("self", "external", "both")  # which feedback steps the state: the model's readings, ratings, or both


@dataclasses.dataclass
class Turn:
    """One step of a session, as `FeedbackLoop.history` keeps it."""

    at: float  # when it happened
    kind: str  # "generate" or "rate"
    control: list  # the control the model generated with (generate), or the control after the rating
    reading: Optional[list]  # the head's mean reading of the outputs (generate with a head), else None
    feedback: Optional[list]  # what was added to the state; None when nothing was (skipped or not a self mode)
    state: list  # the state after this turn
    note: str = ""  # why an update was skipped, if it was


class FeedbackLoop:
    """A closed-loop session over a model with a feedback head.

    Args:
        model: an injected `CausalLM` (`inject`) with a feedback head (`add_feedback_head`) for the
            modes that read it.
        decay: a `DecayFeedback`: half-life, gain `G`, neutral control and `max_norm` of the session.
            Its `control_dim` is the model's; its `feedback_dim` the head's.
        mode: "self" (the model's own readings), "external" (ratings only) or "both".
        target: optional reading to steer toward (`feedback_dim` numbers inside the head's range);
            the feedback is then `target - reading`, else the reading itself.
        start: the session's start time (same unit as the half-life).

    Example:
    >>> loop = FeedbackLoop(lm, DecayFeedback(1, half_life=10.0, max_norm=2.0), mode="self", target=0.8)
    >>> for turn in range(20):
    ...     texts = loop.generate(prompts, at=turn)     # each turn's control follows the last readings
    >>> loop.history[-1].control, loop.history[-1].reading
    """

    def __init__(self, model, decay, mode="self", target=None, start=0.0):
        from keras_biasinject.layers import DecayFeedback

        if not isinstance(decay, DecayFeedback):
            raise TypeError(f"FeedbackLoop: `decay` must be a DecayFeedback. Got {type(decay).__name__}.")
        if mode not in MODES:
            raise ValueError(f"FeedbackLoop: `mode` must be one of {list(MODES)}. Got mode={mode!r}.")
        injection = getattr(model, "injection", None)
        if injection is None or not hasattr(model, "generate"):
            raise ValueError(f"FeedbackLoop: `model` must be an injected CausalLM (keras_biasinject.inject). Got {type(model).__name__}.")
        if injection.config.control_dim != decay.control_dim:
            raise ValueError(f"FeedbackLoop: the model's control_dim is {injection.config.control_dim}, the decay layer's "
                             f"{decay.control_dim}. Make DecayFeedback(control_dim={injection.config.control_dim}, ...).")
        head = model.feedback_head
        if mode != "external":
            if head is None:
                raise ValueError(f"FeedbackLoop: mode={mode!r} reads the model's feedback head, and this model has none. "
                                 "Add and train one (`add_feedback_head`), or use mode='external' (ratings only).")
            if head.feedback_dim != decay.feedback_dim:
                raise ValueError(f"FeedbackLoop: the head gives {head.feedback_dim} reading(s), the decay layer takes "
                                 f"feedback_dim={decay.feedback_dim}. Make DecayFeedback(..., feedback_dim={head.feedback_dim}).")
        self.model, self.decay, self.mode = model, decay, mode
        self.target = self._check_target(target)
        self.start = _time(start, "start")
        self.reset()

    def _check_target(self, target):
        if target is None:
            return None
        if self.mode == "external":
            raise ValueError("FeedbackLoop: a `target` is a reading to steer toward, and mode='external' reads nothing. "
                             "Use mode='self' or 'both', or drop the target.")
        head = self.model.feedback_head
        values = np.asarray(target, "float64").reshape(-1)
        low, high = head.reading_range
        if values.shape != (head.feedback_dim,) or not np.all((values > low) & (values < high)):
            raise ValueError(f"FeedbackLoop: `target` must be {head.feedback_dim} number(s) inside the head's reading range "
                             f"({low}, {high}) ({head.activation} activation). Got target={target!r}.")
        return values.astype("float32")

    def reset(self):
        """Forgets everything: neutral control, empty history, the clock back at `start`."""
        self.state = np.zeros(self.decay.control_dim, "float32")
        self.updated_at = self.start
        self.history = []

    def control(self, at):
        """The session's control at time `at` (its state decayed since the last update)."""
        control, _ = self._stepped(np.zeros(self.decay.feedback_dim, "float32"), self._elapsed(at))
        return control

    def generate(self, prompts, at, **generate_kwargs):
        """Generates for `prompts` with the control at time `at`, then steps the state with the head's
        mean reading of the outputs (self modes). Returns the model's outputs."""
        at = _time(at, "at")
        elapsed = self._elapsed(at)
        control = self.control(at)
        reading = None
        if self.model.feedback_head is None:
            outputs = self.model.generate(prompts, control=control, **generate_kwargs)
        else:
            outputs, readings = self.model.generate(prompts, control=control, return_feedback=True, **generate_kwargs)
            reading = np.mean(np.reshape(readings, (-1, self.model.feedback_head.feedback_dim)), axis=0)
        feedback, note = None, ""
        if self.mode != "external":
            if np.all(np.isfinite(reading)):
                feedback = reading if self.target is None else self.target - reading
                self._apply(feedback, at, elapsed)
            else:
                note = f"non-finite reading {reading.tolist()}: the state was not updated"
                warnings.warn(f"FeedbackLoop.generate at {at}: {note}.", stacklevel=2)
        self.history.append(Turn(at, "generate", control.tolist(), None if reading is None else reading.tolist(),
                                 None if feedback is None else np.asarray(feedback).tolist(), self.state.tolist(), note))
        return outputs

    def rate(self, rating, at):
        """Adds an external rating (`feedback_dim` finite numbers) at time `at`; returns the new control."""
        if self.mode == "self":
            raise ValueError("FeedbackLoop.rate: this session's mode is 'self' (the model's own readings only). "
                             "Make it with mode='external' or 'both' to take ratings.")
        at = _time(at, "at")
        values = np.asarray(rating, "float64").reshape(-1)
        if values.shape != (self.decay.feedback_dim,) or not np.all(np.isfinite(values)):
            raise ValueError(f"FeedbackLoop.rate: `rating` must be {self.decay.feedback_dim} finite number(s). Got rating={rating!r}.")
        control = self._apply(values.astype("float32"), at, self._elapsed(at))
        self.history.append(Turn(at, "rate", control.tolist(), None, values.tolist(), self.state.tolist()))
        return control

    def _elapsed(self, at):
        if at < self.updated_at:
            raise ValueError(f"FeedbackLoop: time {at} is before the session's last update at {self.updated_at}; "
                             "timestamps must not go back.")
        return at - self.updated_at

    def _stepped(self, feedback, elapsed):
        control, state = self.decay(feedback[None, :], state=self.state[None, :], elapsed=np.float32(elapsed))
        return np.asarray(control)[0], np.asarray(state)[0]

    def _apply(self, feedback, at, elapsed):
        control, state = self._stepped(np.asarray(feedback, "float32"), elapsed)
        self.state, self.updated_at = state, at
        return control


def _time(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise ValueError(f"FeedbackLoop: `{name}` must be a finite number (a time, in the half-life's unit). Got {name}={value!r}.")
    return float(value)
