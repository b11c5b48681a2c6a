"""`build_archive`: a model's serving signatures in a `keras.export.ExportArchive`, not yet written.

Each signature holds only TensorFlow ops, so the SavedModel loads with `tf.saved_model.load` in a
process that has neither keras_biasinject nor keras_hub:

- `serve`: the backbone's token inputs (`token_ids`, `padding_mask`, and `segment_ids` for BERT)
  and, for an injected model, `control` `[batch, control_dim]` -> `probabilities` and `logits`
  (classifiers), `logits` (causal LMs) or the backbone's outputs. A plain or merged model has no
  `control` input. A model with a feedback head also returns `feedback` `[batch, feedback_dim]`, the
  head's pooled reading of each sequence (a causal LM's per-token readings pooled by the head).
- `serve_named` (injected models with stored named controls): the same with `control_name`
  `[batch]` (strings) choosing stored named controls.
- `generate` (causal LMs): prompt `token_ids` and `padding_mask` padded to the total length (and
  `control`) -> the completed `token_ids` and `padding_mask`, by KerasHub's own generation loop with
  the sampler the model was compiled with (`compile(sampler="greedy")` for deterministic output),
  and `feedback` `[batch, feedback_dim]` (the head's reading of each finished sequence) with a head.
  Tokenizing stays with the client: tokenizers need tensorflow-text ops that TF Serving lacks.
- `feedback_step` (given a `DecayFeedback`): `state`, `feedback`, `elapsed` -> `new_state`,
  `control`, so that a stateless server and its client carry the decaying state between calls.
"""

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_biasinject.layers import DecayFeedback
from keras_biasinject.rewrite import feedback as feedback_lib
from keras_biasinject.rewrite.injected_model import InjectedModel


def build_archive(model, feedback=None):
    """A `keras.export.ExportArchive` tracking `model` (and `feedback`) with its endpoints added.

    Every check runs before an endpoint is added (`generate` may set a greedy sampler on a causal LM
    that was never compiled)."""
    if feedback is not None and not isinstance(feedback, DecayFeedback):
        raise TypeError(f"export_saved_model: `feedback` must be a DecayFeedback. Got {type(feedback).__name__}.")
    specs = input_specs(model)
    injected = isinstance(model, InjectedModel)
    if isinstance(model, keras_hub.models.CausalLM):
        prepare_generate_sampler(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    add_serve(archive, model, specs, injected)
    if isinstance(model, keras_hub.models.CausalLM):
        add_generate(archive, model, specs, injected)
    if injected and model.named_controls:
        add_serve_named(archive, model, specs)
    if feedback is not None:
        add_feedback_step(archive, feedback)
    return archive


def input_specs(model):
    """One `tf.TensorSpec` per token input of the model's backbone, sorted by name (any batch and length);
    an injected model's `control` input is not one of them (`model_inputs` adds it after them)."""
    backbone = model.backbone if isinstance(model, keras_hub.models.Task) else model
    inputs = backbone.input
    if isinstance(inputs, dict):
        inputs = {name: tensor for name, tensor in inputs.items() if name != "control"}
    if not isinstance(inputs, dict):
        raise ValueError(f"export_saved_model: expected a KerasHub model with dict inputs; {type(model).__name__} has {inputs!r}.")
    return [tf.TensorSpec([None] * len(inputs[key].shape), tf.as_dtype(inputs[key].dtype), name=key) for key in sorted(inputs)]


def model_inputs(specs, args, injected):
    """An endpoint's positional args -> the model's input dict: the inputs `specs` name, in order, then
    (injected models) `control`, the arg after them."""
    inputs = {spec.name: tensor for spec, tensor in zip(specs, args)}
    if injected:
        inputs["control"] = args[len(specs)]
    return inputs


def named_outputs(model, result, inputs=None):
    """The model's result as a signature's named outputs (`logits`, `probabilities`, ...), plus
    `feedback` `[batch, feedback_dim]` for a model with a feedback head (pooled over `inputs`'
    padding mask when the head reads per token)."""
    head = getattr(model, "feedback_head", None)
    if head is None:
        return own_named_outputs(model, result)
    result = dict(result)
    reading = result.pop("feedback")  # (B, T, F) per token for a causal LM, (B, F) otherwise
    if not isinstance(model.output, dict):  # the model's own output is one tensor: as without a head
        (result,) = result.values()
    if feedback_lib.reads_per_token(model):
        reading = head.pool(reading, inputs.get("padding_mask"))  # (B, F)
    return {**own_named_outputs(model, result), "feedback": reading}


def own_named_outputs(model, result):
    """The model's own result (no feedback reading in it) as named outputs."""
    if isinstance(model, keras_hub.models.TextClassifier):
        return {"logits": result, "probabilities": tf.nn.softmax(tf.cast(result, tf.float32), axis=-1)}
    if isinstance(result, dict):
        return dict(result)
    return {"logits" if isinstance(model, keras_hub.models.CausalLM) else "outputs": result}


def serve_signature(model, specs, injected):
    """`specs`, then `control` `[batch, control_dim]` for an injected model."""
    if not injected:
        return list(specs)
    return list(specs) + [tf.TensorSpec([None, model.injection.config.control_dim], tf.float32, name="control")]


def add_serve(archive, model, specs, injected):
    def serve(*args):
        inputs = model_inputs(specs, args, injected)
        return named_outputs(model, model(inputs, training=False), inputs)

    archive.add_endpoint("serve", serve, input_signature=serve_signature(model, specs, injected))


def prepare_generate_sampler(model):
    """Gives a never-compiled causal LM the greedy sampler (as `compile(sampler="greedy")` does); with a
    feedback head, refuses a sampler whose search loop hands back no hidden states to read."""
    if getattr(model, "sampler", None) is None:
        model.sampler = keras_hub.samplers.get("greedy")
    sampler = model.sampler
    if getattr(model, "feedback_head", None) is not None and type(sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
        raise ValueError(
            f"export_saved_model: the `generate` signature of a model with a feedback head returns the head's "
            f"reading, but the {type(sampler).__name__} runs its own search loop, which hands back no hidden "
            f"states. Compile with a sampler that picks one token per step ({feedback_lib.SAMPLERS_WITH_FEEDBACK}), "
            "e.g. `model.compile(sampler='greedy')`, before exporting."
        )


def add_generate(archive, model, specs, injected):
    def generate(*args):
        return dict(model.generate_step(model_inputs(specs, args, injected), stop_token_ids=None))

    archive.add_endpoint("generate", generate, input_signature=serve_signature(model, specs, injected))


def add_serve_named(archive, model, specs):
    names = sorted(model.named_controls)
    vectors = tf.constant(np.asarray([model.named_controls[n] for n in names], "float32"))  # (names, control_dim)
    names = tf.constant(names)

    def serve_named(*args):
        control_name = args[len(specs)]  # (B,)
        hits = tf.cast(tf.equal(control_name[:, None], names[None, :]), tf.int32)  # (B, names)
        tf.debugging.assert_equal(tf.reduce_sum(hits, axis=1), 1, message="unknown control_name")
        control = tf.gather(vectors, tf.argmax(hits, axis=1))  # (B, control_dim)
        inputs = model_inputs(specs, (*args[: len(specs)], control), injected=True)
        return named_outputs(model, model(inputs, training=False), inputs)

    signature = list(specs) + [tf.TensorSpec([None], tf.string, name="control_name")]
    archive.add_endpoint("serve_named", serve_named, input_signature=signature)


def add_feedback_step(archive, feedback):
    archive.track(feedback)

    def feedback_step(state, feedback_value, elapsed):
        control, new_state = feedback(feedback_value, state=state, elapsed=elapsed)
        return {"new_state": new_state, "control": control}

    archive.add_endpoint("feedback_step", feedback_step, input_signature=[
        tf.TensorSpec([None, feedback.control_dim], tf.float32, name="state"),
        tf.TensorSpec([None, feedback.feedback_dim], tf.float32, name="feedback"),
        tf.TensorSpec([None], tf.float32, name="elapsed"),
    ])
