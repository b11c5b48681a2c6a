"""`DecayFeedback`: feedback in, the next control vector out, with a memory that halves every
half-life.

It closes the loop at serving time: a signal about the model's last output (its own output
projected into control space, or a user's rating) moves the control, and the move fades unless
the feedback repeats. Time is an input (`elapsed`), so the same inputs give the same control.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_biasinject.layers import control as control_lib
from keras_biasinject.layers.checks import check_positive_int, check_positive_number, describe, is_finite_number


@keras.saving.register_keras_serializable(package="keras_biasinject")
class DecayFeedback(keras.layers.Layer):
    """Turns feedback into the next control vector, with a memory that fades over time.

    `s' = 2^(-dt / half_life) s + f G`, and `c = neutral + clip(s', max_norm)`.

    `f` is a feedback signal `[feedback_dim]`: the model's own output projected into control space,
    or an external signal such as a user's rating. `G` (`[feedback_dim, control_dim]`, identity at
    initialisation) maps it into control space. `dt` is the time since the state was last updated,
    in any unit (seconds, steps) as long as `half_life` uses the same one; it is an input, so results
    are deterministic. After one half-life without feedback the state has halved; a zero state gives
    exactly the neutral control. `max_norm` bounds the distance of the control from neutral (the
    state itself is not clipped, so it keeps its memory).

    Functional form, for serving and `tf.function`: `control, new_state = layer(f, state=s, elapsed=dt)`.
    Stateful convenience: `layer.step(f, elapsed=dt)` updates the layer's non-trainable `state`
    variable and returns the control; `layer.reset()` zeroes it.

    Args:
        control_dim: width of the control (and of the state).
        half_life: a positive float, or `control_dim` positive floats (one per dimension).
        feedback_dim: width of the feedback; defaults to `control_dim`.
        neutral: the neutral control: a float or `control_dim` floats.
        max_norm: optional bound on `||c - neutral||`.
        trainable_half_life: learn the half-life (stored as its logarithm, so it stays positive).
        gain_initializer: initializer of `G` (default "identity").

    Call arguments:
        feedback: `[..., feedback_dim]`.
        state: `[..., control_dim]`; defaults to zeros (no memory).
        elapsed: `dt >= 0`, a scalar or one per example (`[batch]` or `[batch, 1]`); default 0.

    Outputs: `(control, new_state)`, both `[..., control_dim]`.

    Example:
    >>> fb = DecayFeedback(control_dim=1, half_life=60.0)        # seconds
    >>> c, s = fb(np.array([[1.0]]))                             # c = [[1.0]]
    >>> c, s = fb(np.zeros((1, 1)), state=s, elapsed=60.0)       # c = [[0.5]]
    >>> fb.step(np.array([1.0]), elapsed=0.0); fb.reset()        # stateful use
    """

    def __init__(
        self,
        control_dim,
        half_life,
        feedback_dim=None,
        neutral=0.0,
        max_norm=None,
        trainable_half_life=False,
        gain_initializer="identity",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")  # the state accumulates: keep it in float32
        super().__init__(**kwargs)
        name = self.__class__.__name__
        self.control_dim = check_positive_int(control_dim, "control_dim", name)
        self.feedback_dim = check_positive_int(
            control_dim if feedback_dim is None else feedback_dim, "feedback_dim", name
        )
        values = np.asarray(half_life, dtype=object).reshape(-1).tolist()
        if len(values) not in (1, self.control_dim) or not all(is_finite_number(v) and v > 0 for v in values):
            raise ValueError(
                f"{name}: `half_life` must be one positive finite number or {self.control_dim} of "
                f"them (one per control dimension). Got half_life={describe(half_life)}."
            )
        half_life_values = np.asarray(values, dtype="float64")
        self.half_life = float(half_life_values[0]) if np.ndim(half_life) == 0 else half_life_values.tolist()
        self.neutral = control_lib.check_neutral(neutral, self.control_dim, name)
        self.max_norm = check_positive_number(max_norm, "max_norm", name, allow_none=True)
        self.trainable_half_life = bool(trainable_half_life)
        self.gain_initializer = keras.initializers.get(gain_initializer)
        self.build()

    def build(self, input_shape=None):
        self.gain = self.add_weight(
            name="gain", shape=(self.feedback_dim, self.control_dim), initializer=self.gain_initializer
        )
        log_half_life = np.log(np.broadcast_to(np.asarray(self.half_life, "float64"), (self.control_dim,)))
        self.log_half_life = self.add_weight(
            name="log_half_life",
            shape=(self.control_dim,),
            initializer=keras.initializers.Constant(log_half_life.astype("float32")),
            trainable=self.trainable_half_life,
        )
        self.state = self.add_weight(name="state", shape=(self.control_dim,), initializer="zeros", trainable=False)

    def call(self, feedback, state=None, elapsed=0.0):
        feedback = ops.cast(feedback, self.compute_dtype)
        if feedback.shape[-1] is not None and feedback.shape[-1] != self.feedback_dim:
            raise ValueError(
                f"Layer '{self.path}': feedback has width {feedback.shape[-1]} (shape "
                f"{tuple(feedback.shape)}), expected feedback_dim={self.feedback_dim}. Project the "
                f"signal to {self.feedback_dim} values or rebuild the layer with that feedback_dim."
            )
        elapsed = ops.cast(ops.convert_to_tensor(elapsed), self.compute_dtype)
        _check_values(self.path, feedback=feedback, elapsed=elapsed)
        pushed = ops.matmul(feedback, self.gain)  # (..., control_dim)
        if state is None:
            new_state = pushed
        else:
            state = ops.cast(state, self.compute_dtype)
            _check_values(self.path, state=state)
            if len(elapsed.shape) == 1 and len(state.shape) >= 2:
                elapsed = ops.expand_dims(elapsed, -1)  # one dt per example: (B,) -> (B, 1)
            half_life = ops.exp(self.log_half_life)
            decay = ops.exp(ops.multiply(-math.log(2.0), ops.divide(elapsed, half_life)))  # 2^(-dt/h)
            new_state = ops.add(ops.multiply(decay, state), pushed)
        return self.to_control(new_state), new_state

    def to_control(self, state):
        """`neutral + clip(state, max_norm)`: the control a state stands for."""
        offset = state
        if self.max_norm is not None:
            norm = ops.sqrt(ops.sum(ops.square(state), axis=-1, keepdims=True))
            offset = ops.multiply(state, ops.minimum(1.0, self.max_norm / ops.maximum(norm, 1e-12)))
        return ops.add(ops.cast(ops.convert_to_tensor(self.neutral), offset.dtype), offset)

    def step(self, feedback, elapsed=0.0):
        """Stateful update: decays the `state` variable by `elapsed`, adds `feedback`, returns the control."""
        control, new_state = self(ops.expand_dims(ops.convert_to_tensor(feedback), 0),
                                  state=ops.expand_dims(self.state, 0), elapsed=elapsed)
        self.state.assign(new_state[0])
        return control[0]

    def reset(self):
        """Forgets all feedback: the state returns to zero and the control to neutral."""
        self.state.assign(ops.zeros(self.state.shape))

    def get_config(self):
        return {
            **super().get_config(),
            "control_dim": self.control_dim,
            "half_life": self.half_life,
            "feedback_dim": self.feedback_dim,
            "neutral": self.neutral,
            "max_norm": self.max_norm,
            "trainable_half_life": self.trainable_half_life,
            "gain_initializer": keras.initializers.serialize(self.gain_initializer),
        }


def _check_values(path, **tensors):
    """Eagerly rejects NaN/inf inputs and negative `elapsed`.

    Traced callers (`tf.function`, `jax.jit`) pass symbolic tensors that have no values yet; the
    serving export validates its inputs at the signature instead.
    """
    for name, tensor in tensors.items():
        try:
            values = ops.convert_to_numpy(tensor)
        except Exception:  # a symbolic tensor inside a trace: no values to check
            return
        if name == "elapsed":
            if np.any(np.isnan(values)) or np.any(values < 0):
                raise ValueError(
                    f"Layer '{path}': `elapsed` must be >= 0 (time since the state was last "
                    f"updated; +inf forgets everything). Got elapsed={values.tolist()}."
                )
        elif not np.all(np.isfinite(values)):
            raise ValueError(
                f"Layer '{path}': `{name}` contains NaN or inf ({values.tolist()}). Feedback and "
                "state must be finite: drop or clip the bad signal before feeding it back."
            )
