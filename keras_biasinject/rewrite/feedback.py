"""The extended output layer: a `FeedbackHead` attached to an injected model, and how its reading
is taken while the model runs and while it generates.

`add_feedback_head(model, FeedbackHead(1))` adds output nodes to an injected backbone or task. The
model's call then returns a dict: its own output, unchanged bit for bit (under "logits" for a task,
"sequence_output" for a backbone, or its own keys), and "feedback", the head's reading of the
backbone's final hidden states (per token for a causal LM, so every prefix learns the label; pooled
otherwise). `model.read_feedback(tokens)` gives the pooled reading of whole sequences, and
`generate(..., return_feedback=True)` the reading of what was generated, from the hidden states the
generation loop computes anyway (no second forward pass).
"""

import contextlib
import threading

import keras
import keras_hub
from keras import ops
from keras_hub.src.utils.tensor_utils import any_equal

from keras_biasinject.layers.feedback_head import FeedbackHead
from keras_biasinject.rewrite.kerashub import backbone_of

_capture = threading.local()
SAMPLERS_WITH_FEEDBACK = "GreedySampler, TopKSampler, TopPSampler, RandomSampler"


def add_feedback_head(model, head=None, **fields):
    """Adds `head` (a `FeedbackHead`, or one made from `fields`) as extra output nodes; returns `model`.

    Every check runs first: on error the model is unchanged. The head trains with `model.fit` as the
    output "feedback" (its own loss and loss weight: `compile(loss={"logits": ..., "feedback": ...})`)
    and is saved with `.keras` files and `save_adapter`.

    Example:
    >>> lm = inject(keras_biasinject.load("smollm2-135m", task="causal_lm"), targets="all-linear")
    >>> add_feedback_head(lm, FeedbackHead(1, activation="sigmoid"))
    >>> texts, readings = lm.generate(["The coffee"], control=[1.0], return_feedback=True)
    """
    from keras_biasinject.rewrite.injected_model import InjectedModel

    if head is None:
        head = FeedbackHead(**fields)
    elif fields:
        raise TypeError(f"add_feedback_head: give a FeedbackHead or its fields, not both. Got fields {sorted(fields)}.")
    if not isinstance(head, FeedbackHead):
        raise TypeError(f"add_feedback_head: `head` must be a FeedbackHead. Got {type(head).__name__}.")
    if not isinstance(model, InjectedModel):
        raise ValueError(
            f"add_feedback_head: this {type(model).__name__} is not injected. The head's output comes out through "
            "the injected model's call: run `model = inject(model, ...)` first (targets=... as you need)."
        )
    if getattr(model, "feedback_head", None) is not None:
        raise ValueError(f"add_feedback_head: this model has a feedback head already ({model.feedback_head.name!r}); "
                         "call `remove_feedback_head(model)` first to replace it.")
    hidden_dim = _hidden_dim(model)  # raises, naming the output, when there is nothing to read
    if not head.built:
        head.build((None, None, hidden_dim))
    elif head.kernel.shape[0] != hidden_dim:
        raise ValueError(
            f"add_feedback_head: head {head.name!r} was built for hidden_dim {head.kernel.shape[0]}, but this model's "
            f"hidden states have {hidden_dim}. Use a new FeedbackHead (or the one trained for this model)."
        )
    _set_head(model, head)
    return model


def remove_feedback_head(model):
    """Takes the head off again: the model's output is its own output only. Returns the head."""
    head = getattr(model, "feedback_head", None)
    if head is None:
        raise ValueError("remove_feedback_head: this model has no feedback head.")
    model.__dict__.pop("feedback_head", None)  # back to the class default, None
    model._layers[:] = [layer for layer in model._layers if layer is not head]
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None
    return head


def _set_head(model, head):
    model._tracker.unlock()  # built KerasHub models lock their attributes
    try:
        model.feedback_head = head
    finally:
        model._tracker.lock()
    if getattr(model, "generate_function", None) is not None:
        model.generate_function = None  # compiled without (or with) the head: recompile
    # The outputs change shape: metrics compiled for the old ones would fail in `fit`, and Keras keeps
    # them through a later `compile(...)` that names no metrics. Compile again after adding the head.
    model._compile_metrics = None


def _hidden_dim(model):
    backbone = backbone_of(model, "add_feedback_head")
    output = backbone.output
    if isinstance(output, dict):
        output = output.get("sequence_output")
    shape = None if output is None else tuple(output.shape)
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"add_feedback_head: the backbone {type(backbone).__name__} does not return hidden states [batch, seq, "
            f"hidden_dim] (its output: {backbone.output!r}). A feedback head reads a KerasHub text backbone's "
            "sequence output; attach it to such a model."
        )
    return shape[-1]


def sequence_output(outputs):
    """The final hidden states `[batch, seq, hidden_dim]` in a backbone's outputs."""
    return outputs["sequence_output"] if isinstance(outputs, dict) else outputs


def with_feedback(model, outputs, reading):
    """The model's own outputs (untouched) plus "feedback"."""
    if isinstance(outputs, dict):
        return {**outputs, "feedback": reading}
    key = "sequence_output" if isinstance(model, keras_hub.models.Backbone) else "logits"
    return {key: outputs, "feedback": reading}


def reads_per_token(model):
    return isinstance(model, keras_hub.models.CausalLM)


@contextlib.contextmanager
def _collecting(local):
    """Inside the block, `local.items` is a fresh list (per thread) that the block's callees append to."""
    previous = getattr(local, "items", None)
    local.items = []
    try:
        yield local.items
    finally:
        local.items = previous


@contextlib.contextmanager
def backbone_capture(enabled):
    """Inside the block, every injected backbone's output is appended to the yielded list."""
    if not enabled:
        yield None
        return
    with _collecting(_capture) as outputs:
        yield outputs


def record_backbone_output(outputs):
    captured = getattr(_capture, "items", None)
    if captured is not None:
        captured.append(outputs)


# Generation: KerasHub's sampler loop keeps only the tokens, so models with a head run the same loop
# here with the hidden states carried along.

def check_sampler(model):
    sampler = model.sampler
    if type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
        raise ValueError(
            f"generate(return_feedback=True): the {type(sampler).__name__} runs its own search loop, which does not "
            f"hand back hidden states. Compile with a sampler that picks one token per step ({SAMPLERS_WITH_FEEDBACK}), "
            "e.g. `model.compile(sampler='greedy')`."
        )


def generate_step_with_feedback(model, inputs, stop_token_ids=None):
    """KerasHub's `generate_step` (cache, sampler loop, stop tokens), also returning "feedback": the
    head's reading of each finished sequence, from the hidden states the loop computed."""
    token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
    sampler = model.sampler
    hidden, cache = model._build_cache(token_ids)  # (B, T, H): the prompt's positions, one pass
    mask = ops.cast(padding_mask, "bool")
    batch = ops.shape(token_ids)[0]
    index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

    def feed(prompt, cache, hidden, index):
        """Runs the token at `index - 1` through the cache: its logits, and its hidden state kept."""
        step = ops.slice(prompt, [0, index - 1], [batch, 1])
        logits, h, cache = model.call_with_cache(step, cache, index - 1)
        hidden = ops.slice_update(hidden, [0, index - 1, 0], ops.cast(h, hidden.dtype))
        return ops.squeeze(logits, axis=1), cache, hidden

    def cond(prompt, cache, hidden, index):
        if stop_token_ids is None:
            return ops.convert_to_tensor(True, dtype="bool")
        done = ops.any(any_equal(prompt, stop_token_ids, ops.logical_not(mask)), axis=-1)
        return ops.logical_not(ops.all(done))

    def body(prompt, cache, hidden, index):  # as keras_hub.samplers.Sampler.__call__, hidden states kept
        logits, cache, hidden = feed(prompt, cache, hidden, index)
        next_token = ops.cast(sampler.get_next_token(sampler.compute_probabilities(logits)), prompt.dtype)
        next_token = ops.where(mask[:, index], prompt[:, index], next_token)
        prompt = ops.slice_update(prompt, [0, index], next_token[:, None])
        return prompt, cache, hidden, index + 1

    max_length = ops.shape(token_ids)[-1]
    token_ids, cache, hidden, index = sampler.run_loop(
        cond, body, loop_vars=(token_ids, cache, hidden, index), maximum_iterations=max_length - index, model=model
    )
    _, _, hidden = feed(token_ids, cache, hidden, index)  # the last token's hidden state: one step, not a pass
    padding_mask = _finished_mask(token_ids, padding_mask, stop_token_ids)
    reading = model.feedback_head(hidden, padding_mask=padding_mask)  # (B, F)
    return {"token_ids": token_ids, "padding_mask": padding_mask, "feedback": reading}


def _finished_mask(token_ids, padding_mask, stop_token_ids):
    """As KerasHub's generate_step: real tokens up to and including each row's first new stop token."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    end = ops.cast(any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)), "int32")
    return ops.logical_not(ops.cast(ops.cumsum(end, axis=-1) - end, "bool"))


_sink = threading.local()


def feedback_sink():
    """Inside the block, the readings of each generated batch are appended to the yielded list."""
    return _collecting(_sink)


def keep_feedback(compiled):
    """Wraps a compiled generate function: "feedback" goes to the open sink, tokens go on as usual."""

    def generate_function(inputs, stop_token_ids=None):
        outputs = dict(compiled(inputs, stop_token_ids=stop_token_ids))
        reading = outputs.pop("feedback", None)
        readings = getattr(_sink, "items", None)
        if readings is not None and reading is not None:
            readings.append(keras.ops.convert_to_numpy(reading))
        return outputs

    return generate_function
