"""`export_saved_model`: a model as a TensorFlow SavedModel that TF Serving runs as it is.

The export goes to `<base_dir>/<name>/<version>/`, TF Serving's layout, and holds only TensorFlow
ops: it loads with `tf.saved_model.load` in a process that has neither keras_biasinject nor
keras_hub. Signatures:

- `serve`: the backbone's token inputs (`token_ids`, `padding_mask`, and `segment_ids` for BERT)
  and `control` `[batch, control_dim]` -> `probabilities` and `logits` (classifiers), `logits`
  (causal LMs) or the backbone's outputs. With `control=` fixed at export, the update is merged
  into the weights and `serve` has no `control` input: the base model's cost exactly.
- `serve_named`: the same with `control_name` `[batch]` (strings) choosing stored named controls.
- `generate` (causal LMs): prompt `token_ids` and `padding_mask` padded to the total length (and
  `control`) -> the completed `token_ids` and `padding_mask`, by KerasHub's own generation loop with
  the sampler the model was compiled with (`compile(sampler="greedy")` for deterministic output).
  Tokenizing stays with the client: tokenizers need tensorflow-text ops that TF Serving lacks.
- `feedback_step` (given a `DecayFeedback`): `state`, `feedback`, `elapsed` -> `new_state`,
  `control`, so that a stateless server and its client carry the decaying state between calls.

With a `DecayFeedback`, its config and weights are kept in `assets.extra/keras_biasinject.json`
(TF Serving ignores that folder), so that a server can publish a new version after self-tuning.

The version folder appears in one rename: an interrupted export leaves no version that a server
would load, and an existing version is replaced only with `overwrite=True`.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def next_version(base_dir, name):
    """1 + the highest numeric version under `<base_dir>/<name>` (1 when there is none)."""
    folder = Path(base_dir) / name
    versions = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return max(versions, default=0) + 1


def _input_specs(model):
    import keras_hub

    backbone = model.backbone if isinstance(model, keras_hub.models.Task) else model
    inputs = backbone.input
    if not isinstance(inputs, dict):
        raise ValueError(f"export_saved_model: expected a KerasHub model with dict inputs; {type(model).__name__} has {inputs!r}.")
    specs = []
    for key in sorted(inputs):
        tensor = inputs[key]
        specs.append(tf.TensorSpec([None] * len(tensor.shape), tf.as_dtype(tensor.dtype), name=key))
    return specs


def _outputs(model, result):
    import keras_hub

    if isinstance(model, keras_hub.models.TextClassifier):
        return {"logits": result, "probabilities": tf.nn.softmax(tf.cast(result, tf.float32), axis=-1)}
    if isinstance(result, dict):
        return dict(result)
    return {"logits" if isinstance(model, keras_hub.models.CausalLM) else "outputs": result}


def _check_destination(base_dir, name, version, overwrite):
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"export_saved_model: `name` must be a plain folder name. Got name={name!r}.")
    if version is None:
        version = next_version(base_dir, name)
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(f"export_saved_model: `version` must be a positive integer (TF Serving's rule). Got version={version!r}.")
    final = Path(base_dir) / name / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"export_saved_model: {str(final)!r} exists; TF Serving may be serving it. Pass overwrite=True "
            "(kbi export --overwrite) to replace it, or export a new version."
        )
    return final


def export_saved_model(model, base_dir, name="model", version=None, *, control=None, feedback=None, overwrite=False):
    """Exports `model` to `<base_dir>/<name>/<version>/` and returns that path.

    Args:
        model: a KerasHub Task or Backbone, injected or plain.
        base_dir: TF Serving's model base path.
        name: the model name in TF Serving's URLs (`/v1/models/<name>:predict`).
        version: a positive integer; default: one more than the highest there.
        control: a control vector or stored name to merge into the weights (injected models only);
            the export then has no `control` input and costs what the base costs.
        feedback: a `DecayFeedback` whose `feedback_step` signature to add.
        overwrite: replace an existing version folder.
    """
    import keras_hub

    from keras_biasinject.rewrite.injected_model import InjectedModel
    from keras_biasinject.rewrite.merge import merge

    final = _check_destination(base_dir, name, version, overwrite)
    injected = isinstance(model, InjectedModel)
    if control is not None:
        if not injected:
            raise ValueError("export_saved_model: `control` merges an adapter's update; this model has no adapters (use `inject`).")
        named = dict(model.named_controls)
        model, injected = merge(model, control), False
    else:
        named = dict(model.named_controls) if injected else {}
    specs = _input_specs(model)
    preprocessor = getattr(model, "preprocessor", None)

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(*args):
        inputs = {spec.name: tensor for spec, tensor in zip(specs, args)}
        if injected:
            inputs["control"] = args[len(specs)]
        return _outputs(model, model(inputs, training=False))

    signature = list(specs)
    if injected:
        dim = model.injection.config.control_dim
        signature.append(tf.TensorSpec([None, dim], tf.float32, name="control"))
    archive.add_endpoint("serve", serve, input_signature=signature)

    if isinstance(model, keras_hub.models.CausalLM):
        if getattr(model, "sampler", None) is None:  # never compiled: greedy, as compile(sampler="greedy") sets
            model.sampler = keras_hub.samplers.get("greedy")

        def generate(*args):
            inputs = {spec.name: tensor for spec, tensor in zip(specs, args)}
            if injected:
                inputs["control"] = args[len(specs)]
            return dict(model.generate_step(inputs, stop_token_ids=None))

        archive.add_endpoint("generate", generate, input_signature=signature)

    if injected and named:
        names = tf.constant(sorted(named))
        vectors = tf.constant(np.asarray([named[n] for n in sorted(named)], "float32"))

        def serve_named(*args):
            control_name = args[len(specs)]
            hits = tf.cast(tf.equal(control_name[:, None], names[None, :]), tf.int32)  # (B, names)
            tf.debugging.assert_equal(tf.reduce_sum(hits, axis=1), 1, message="unknown control_name")
            control = tf.gather(vectors, tf.argmax(hits, axis=1))
            return serve(*args[: len(specs)], control)

        archive.add_endpoint("serve_named", serve_named, input_signature=list(specs) + [tf.TensorSpec([None], tf.string, name="control_name")])

    if feedback is not None:
        from keras_biasinject.layers import DecayFeedback

        if not isinstance(feedback, DecayFeedback):
            raise TypeError(f"export_saved_model: `feedback` must be a DecayFeedback. Got {type(feedback).__name__}.")
        archive.track(feedback)

        def feedback_step(state, feedback_value, elapsed):
            control, new_state = feedback(feedback_value, state=state, elapsed=elapsed)
            return {"new_state": new_state, "control": control}

        archive.add_endpoint("feedback_step", feedback_step, input_signature=[
            tf.TensorSpec([None, feedback.control_dim], tf.float32, name="state"),
            tf.TensorSpec([None, feedback.feedback_dim], tf.float32, name="feedback"),
            tf.TensorSpec([None], tf.float32, name="elapsed"),
        ])

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))  # TF Serving skips dot folders
    try:
        if preprocessor is not None:
            model.preprocessor = None  # tokenizers need tensorflow-text ops; the export takes token ids
        archive.write_out(str(tmp / "saved_model"), verbose=False)
        if feedback is not None:  # so that a server can re-export after self-tuning (serving/adapt.py)
            extra = tmp / "saved_model" / "assets.extra"
            extra.mkdir(exist_ok=True)
            (extra / "keras_biasinject.json").write_text(json.dumps({"feedback": {
                "config": keras.saving.serialize_keras_object(feedback),
                "weights": [np.asarray(w).tolist() for w in feedback.get_weights()],
            }}))
        if final.exists():  # overwrite=True: swap, so that a whole version is always there
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "v")
            os.replace(tmp / "saved_model", final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "saved_model", final)
    finally:
        if preprocessor is not None:
            model.preprocessor = preprocessor
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
