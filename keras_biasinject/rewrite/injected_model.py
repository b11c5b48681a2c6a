"""The class an injected model takes: its own KerasHub class plus a `control` input.

`inject` keeps the model's class (an injected `GPT2Backbone` is still a `GPT2Backbone`) by moving the
object to a subclass made once per class, `Injected<Class>`, which adds:

- `call`: takes `control` from the inputs dict (or the enclosing `control_scope`) and runs the
  original graph inside `control_scope(control)`, so the adapters spliced into the blocks read it;
- `generate(..., control=...)` for `CausalLM`s: the control travels in a thread-local slot to the
  generate function, which adds it to the preprocessed inputs of the compiled generation loop (that
  calls the blocks through `call_with_cache`); no shared object is modified, so threads generating
  with different controls on one model do not interfere;
- `get_config`/`from_config`: the base model's own config plus the `InjectionConfig`. Loading
  rebuilds the base from its config and redoes the splice, so `keras.models.load_model` restores
  the same layer tree and loads every weight by path;
- `injection`: the report (matched paths, trainable and total parameters), printed by `summary()`;
- several adapters (`inject` again with another `name`, or `load_adapter(..., name=...)`): one control,
  the adapters' controls side by side; `adapters`, `control_layout`, `control_for` and `mix` (a
  weighted mix of adapters, per row if wanted) address each; a control of the wrong width is refused
  with the layout;
- `named_controls`: control vectors stored under names (`"positive"`), saved with the model and with
  `save_adapter`, and accepted wherever a control is (`model({..., "control": ["positive", "off"]})`,
  `generate(..., control="positive")`).
- non-finite controls refused: a concrete (numpy, list, eager tensor) control holding NaN or inf
  raises ValueError in `call`, `fit`, `predict`, `evaluate` and `generate`; a control inside a
  `tf.data.Dataset` or traced (`tf.function`, `jax.jit`) has no values to read ahead, so `fit` also
  checks the trainable weights after training and raises if any became NaN or inf.
"""

import contextlib
import math
import threading

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_biasinject.layers.checks import check_finite_control, is_finite_number
from keras_biasinject.layers.control import control_scope, current_control
from keras_biasinject.rewrite import feedback as feedback_lib
from keras_biasinject.rewrite.config import InjectionConfig
from keras_biasinject.rewrite.kerashub import backbone_of, with_tied_embeddings

REGISTERED_NAME = "InjectedModel"
DEFAULT_NAME = "default"  # the name of an adapter injected without one (as in inject.py)
_classes = {}  # base class -> its Injected subclass


def _split_control(inputs, model=None):
    if isinstance(inputs, dict) and "control" in inputs:
        inputs = dict(inputs)
        control = inputs.pop("control")
        return inputs, control if model is None else model.resolve_control(control)
    return inputs, current_control()


def _check_data_control(x, where):
    """Raises ValueError if `x` is a dict whose "control" has concrete NaN or inf values.

    Numpy arrays, lists and eager tensors are checked; a symbolic control (inside `tf.function` or
    `jax.jit`, where Keras runs `fit`/`predict` steps) has no values yet and is not."""
    if isinstance(x, dict) and "control" in x and not _is_names(x["control"]):
        check_finite_control(x["control"], f"{where}: inputs['control']")


def check_finite_weights(model, where):
    """Raises ValueError naming the trainable weights of `model` that hold NaN or inf."""
    bad = [w.path for w in model.trainable_weights if not np.all(np.isfinite(ops.convert_to_numpy(w)))]
    if bad:
        raise ValueError(
            f"{where}: training made {len(bad)} trainable weight(s) NaN or inf ({bad[:4]}{' ...' if len(bad) > 4 else ''}): "
            "it diverged. Likely causes: a learning rate too high, or NaN/inf in the data or the control. Lower the "
            "learning rate or clean the data, and reload the weights (e.g. `load_adapter`) before using this model."
        )


def refuse_quantized_lm_head(model, where):
    """Raises ValueError before a causal LM trains through a quantized `ReversibleEmbedding` (its LM head).

    Keras' quantized reverse projection (int8: `_int8_call(reverse=True)`) multiplies integer tensors
    with no custom gradient, so its input's gradient flows only through the per-token input scale: the
    hidden states get a wrong gradient, and so does every adapter below the head (`bench/int8_gradient.py`).
    Checked before anything trains; the model is not changed."""
    if not isinstance(model, keras_hub.models.CausalLM):
        return
    heads = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.ReversibleEmbedding) and layer.quantization_mode is not None]
    if heads:
        raise ValueError(
            f"{where}: layer '{heads[0].path}' is a ReversibleEmbedding quantized to {heads[0].quantization_mode}, this causal LM's "
            "output head. Keras' quantized reverse projection gives its input a wrong gradient (only through the input's "
            "scale), so the adapters would train on a wrong gradient. Quantize the model without it: "
            "`model.quantize(\"int8\", filters=lambda layer: not isinstance(layer, keras.layers.ReversibleEmbedding))` "
            "(a recipe's `[model] quantize` does this)."
        )


def build_optimizer(model):
    """Builds `model`'s optimizer for its trainable variables now, before Keras traces a training step.

    Without a distribution strategy, Keras' TensorFlow trainer leaves an unbuilt optimizer to the first
    trace of the train step, so that trace creates the optimizer's variables; `tf.function` then traces
    the step a second time, without creating variables, and keeps both graphs. Built first, the step is
    traced once: the first step is faster and the peak memory lower, for any model (figures in the
    README, from `bench/memory.py`). Does nothing on other backends (they build it before compiling the step), for a model without an
    optimizer or with layers not yet built (Keras builds those from the first batch), or when the
    optimizer is built already."""
    optimizer = getattr(model, "optimizer", None)
    if keras.backend.backend() != "tensorflow" or optimizer is None or optimizer.built:
        return
    if not all(layer.built for layer in model._flatten_layers()):
        return
    with model.distribute_strategy.scope():  # a strategy's model: its variables, under its scope
        optimizer.build(model.trainable_variables)


def _is_numbers(value):
    """Numbers, a (nested) list of them or an array, not strings or dicts."""
    try:
        return np.asarray(value).dtype.kind in "fiu"
    except (ValueError, TypeError):
        return False


def _is_names(control):
    return isinstance(control, str) or (
        isinstance(control, (list, tuple)) and len(control) > 0 and all(isinstance(c, str) for c in control)
    )


@keras.saving.register_keras_serializable(package="keras_biasinject", name=REGISTERED_NAME)
class InjectedModel:
    """Mixin placed before a KerasHub Backbone or Task class. See the module docstring."""

    injection = None  # InjectionReport, set by `inject`
    feedback_head = None  # a FeedbackHead, set by `add_feedback_head`
    _base_class = None  # the KerasHub class this one extends, set by `injected_class`

    @property
    def named_controls(self):
        """{name: tuple of control_dim floats}; shared by an injected task and its backbone."""
        return self.injection.named_controls

    def add_control(self, name, vector):
        """Stores `vector` (`control_dim` finite floats) under `name`, replacing any earlier one."""
        dim = self.injection.config.control_dim
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"add_control: `name` must be a non-empty string. Got name={name!r}.")
        if np.ndim(vector) <= 1 and not all(is_finite_number(v) for v in np.asarray(vector, dtype=object).reshape(-1)):
            raise ValueError(f"add_control: control {name!r} must be finite numbers. Got {str(vector)[:80]}.")
        values = np.asarray(vector, dtype="float64").reshape(-1) if np.ndim(vector) <= 1 else None
        if values is None or values.shape != (dim,):
            raise ValueError(
                f"add_control: control {name!r} must be {dim} number(s) (control_dim={dim}). Got {vector!r}."
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"add_control: control {name!r} must be finite. Got {vector!r}.")
        self.named_controls[name] = tuple(float(v) for v in values)

    @property
    def adapters(self):
        """{name: InjectionReport} of the model's adapters, in injection order (the order of their parts of
        the control)."""
        several = getattr(self.injection, "adapters", None)
        return dict(several) if several is not None else {self.injection.name: self.injection}

    @property
    def control_layout(self):
        """{adapter name: (start, stop)}: the slice `control[..., start:stop]` each adapter reads."""
        layout, start = {}, 0
        for name, report in self.adapters.items():
            layout[name] = (start, start + report.config.control_dim)
            start += report.config.control_dim
        return layout

    def control_for(self, controls):
        """The model's control with each named adapter at its given control and every other at its neutral.

        `controls`: {adapter name: its control, `[its control_dim]` or `[batch, its control_dim]`}; or a
        list of such dicts, one per row of a batch. Returns `[control_dim]` or `[batch, control_dim]` (numpy).

        >>> model.control_for({"a": [1.0]})                         # adapter a on, b neutral
        >>> model.control_for([{"a": [1.0]}, {"b": [1.0]}, {}])      # per row: a, b, none
        """
        if isinstance(controls, (list, tuple)):
            rows = [self.control_for(row) for row in controls]
            if not rows or any(row.ndim != 1 for row in rows):
                raise ValueError("control_for: a list gives one dict per row of a batch, each naming vectors "
                                 f"([control_dim] per adapter); got {len(rows)} row(s) of shapes {[r.shape for r in rows]}.")
            return np.stack(rows)
        self._check_adapter_names(controls, "control_for")
        neutral = self._neutral_vector()
        parts = []
        for name, (start, stop) in self.control_layout.items():
            if name not in controls:
                parts.append(neutral[start:stop])
                continue
            part = np.asarray(controls[name], "float32") if _is_numbers(controls[name]) else None
            if part is None or part.ndim not in (1, 2) or part.shape[-1] != stop - start or not np.all(np.isfinite(part)):
                raise ValueError(
                    f"control_for: adapter {name!r} reads {stop - start} value(s) (control[..., {start}:{stop}]); give it "
                    f"finite numbers of shape [{stop - start}] or [batch, {stop - start}]. Got {str(controls[name])[:80]}."
                )
            parts.append(part)
        rows = {p.shape[0] for p in parts if p.ndim == 2}
        if len(rows) > 1:
            raise ValueError(f"control_for: the per-row controls have different numbers of rows {sorted(rows)}; give each "
                             "adapter one row per example of the same batch, or one vector for all.")
        if rows:
            batch = rows.pop()
            parts = [np.broadcast_to(p, (batch, p.shape[-1])) for p in parts]
        return np.concatenate(parts, axis=-1)

    def mix(self, weights):
        """The model's control that turns each named adapter to `weight` and leaves the others neutral.

        `weights`: {adapter name: weight}, or a list of such dicts, one per row of a batch. Weight `w`
        sets every entry of that adapter's control to `neutral + w`. With gate "control" every term an
        adapter adds is linear in `c - neutral`, so its update at `w` is exactly `w` times its update at
        `neutral + 1` (`w = 0` is off, 1 is on, 0.5 half): a mix adds the adapters' updates in those
        proportions (LoRAX's `merged_adapters`, PEFT's `adapter_names` per row). With gate "always", the
        adapter's plain LoRA update stays at `w = 0` and `w` scales only the control's change to it (the
        gain `(c - neutral) U` and bias `(c - neutral) V`): it is not switched off.

        >>> model.mix({"a": 0.7, "b": 0.3})                          # [control_dim]
        >>> model.mix([{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": 0.5}, {}])   # per row
        """
        if isinstance(weights, (list, tuple)):
            return self.control_for([self._mix_controls(row) for row in weights])
        return self.control_for(self._mix_controls(weights))

    def _mix_controls(self, weights):
        self._check_adapter_names(weights, "mix")
        bad = {name: w for name, w in weights.items() if not is_finite_number(w)}
        if bad:
            raise ValueError(f"mix: each adapter's weight must be one finite number (0 off, 1 on). Got {bad}.")
        layout, neutral = self.control_layout, self._neutral_vector()
        return {name: neutral[layout[name][0]:layout[name][1]] + np.float32(w) for name, w in weights.items()}

    def _neutral_vector(self):
        """The neutral control as `[control_dim]` float32 (a config may give one float for all)."""
        config = self.injection.config
        return np.broadcast_to(np.asarray(config.neutral, "float32"), (config.control_dim,)).copy()

    def _check_adapter_names(self, mapping, where):
        if not isinstance(mapping, dict):
            raise TypeError(f"{where}: expected a dict {{adapter name: value}} (or a list of them, one per row). "
                            f"Got a {type(mapping).__name__}.")
        unknown = [name for name in mapping if name not in self.control_layout]
        if unknown:
            layout = ", ".join(f"{n!r} -> control[..., {a}:{b}]" for n, (a, b) in self.control_layout.items())
            raise ValueError(
                f"{where}: unknown adapter(s) {unknown}. This model's adapters are {list(self.control_layout)} ({layout}); "
                "name one of them, or add it first with `load_adapter(model, path, name=...)` or `inject(model, name=...)`."
            )

    def _check_control_width(self, control, where):
        """With several adapters, the control must be as wide as their controls side by side."""
        if getattr(self.injection, "adapters", None) is None:
            return  # one adapter: its layers name a wrong width themselves
        shape = tuple(control.shape) if hasattr(control, "shape") else np.shape(control)
        layout = self.injection.config
        if len(shape) == 0 or (shape[-1] is not None and shape[-1] != layout.control_dim):
            raise ValueError(
                f"{where} has shape {shape}, but this model's control has {layout.control_dim} values on its last axis: "
                f"its adapters' controls side by side ({layout}). Build one with `model.control_for({{name: control}})` "
                "or `model.mix({name: weight})`."
            )

    def resolve_control(self, control):
        """A name -> its vector `[control_dim]`; a list of names -> `[batch, control_dim]`; else as is."""
        if not _is_names(control):
            return control
        names = [control] if isinstance(control, str) else list(control)
        unknown = [n for n in names if n not in self.named_controls]
        if unknown:
            raise ValueError(
                f"Unknown named control(s) {unknown}. Stored names: {sorted(self.named_controls)}; "
                "add one with `model.add_control(name, vector)`."
            )
        vectors = np.asarray([self.named_controls[n] for n in names], dtype="float32")
        return vectors[0] if isinstance(control, str) else vectors

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, dict) and "control" in inputs and inputs["control"] is None:
            inputs = {k: v for k, v in inputs.items() if k != "control"}  # an optional input left empty: neutral
        if isinstance(inputs, dict) and _is_names(inputs.get("control")):  # names -> vectors, before tracing
            inputs = {**inputs, "control": self.resolve_control(inputs["control"])}
        _check_data_control(inputs, "call")
        if isinstance(inputs, dict) and inputs.get("control") is not None:
            self._check_control_width(inputs["control"], "call: inputs['control']")
            self._check_control_rank(inputs["control"], "call: inputs['control']")
        if isinstance(inputs, dict) and isinstance(inputs.get("control"), (np.ndarray, list, tuple, float, int)):
            # Keras refuses a dict that mixes tensors (from a preprocessor) with arrays: match them.
            if any(keras.ops.is_tensor(v) for k, v in inputs.items() if k != "control"):
                inputs = {**inputs, "control": keras.ops.convert_to_tensor(inputs["control"], "float32")}
        return super().__call__(inputs, *args, **kwargs)

    def _check_control_rank(self, control, where):
        """An encoder-decoder takes one control per example: its two sequences differ in length, so a
        per-token control `[batch, seq, control_dim]` could not say which tokens it means."""
        structure = super().input
        if not (isinstance(structure, dict) and any(name.startswith("encoder_") for name in structure)):
            return
        rank = len(control.shape) if hasattr(control, "shape") else np.ndim(control)
        if rank > 2:
            shape = tuple(control.shape) if hasattr(control, "shape") else np.shape(control)
            raise ValueError(
                f"{where} has shape {shape}, but {type(self).__name__} is an encoder-decoder: it takes one control per "
                f"example, [batch, control_dim] (or [control_dim] for all), which reaches the encoder and the decoder. "
                "Its encoder and decoder sequences differ in length, so a per-token control is ambiguous: pass one "
                "row per example (e.g. control.mean(axis=1))."
            )

    def call(self, inputs, *args, **kwargs):
        inputs, control = _split_control(inputs, self)
        head = self.feedback_head
        is_backbone = isinstance(self, keras_hub.models.Backbone)
        with control_scope(control), feedback_lib.backbone_capture(head is not None and not is_backbone) as seen:
            outputs = super().call(inputs, *args, **kwargs)
        if is_backbone:
            feedback_lib.record_backbone_output(outputs)  # for a task above that has a head
        if head is None:
            return outputs
        hidden = feedback_lib.sequence_output(outputs if is_backbone else seen[-1])
        mask = inputs.get("padding_mask") if isinstance(inputs, dict) else None
        reading = head(hidden, padding_mask=mask, per_token=feedback_lib.reads_per_token(self))
        return feedback_lib.with_feedback(self, outputs, reading)

    def fit(self, x=None, *args, **kwargs):
        """`Model.fit`, refusing a concrete non-finite control in `x` before training and a NaN or inf
        trainable weight after it (see `check_finite_weights`). A control inside a `tf.data.Dataset` or
        a generator is not read ahead; a non-finite one there is caught by the check after training."""
        _check_data_control(x, "fit")
        refuse_quantized_lm_head(self, "fit")
        build_optimizer(self)  # one trace of the train step, not two
        history = super().fit(x, *args, **kwargs)
        check_finite_weights(self, "fit")
        return history

    def train_on_batch(self, x, *args, **kwargs):
        """`Model.train_on_batch`, with the optimizer built before the step is traced (`build_optimizer`)."""
        _check_data_control(x, "train_on_batch")
        refuse_quantized_lm_head(self, "train_on_batch")
        build_optimizer(self)
        return super().train_on_batch(x, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`Model.predict`, refusing a concrete non-finite control in `x` (it would give NaN outputs)."""
        _check_data_control(x, "predict")
        return super().predict(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        _check_data_control(x, "evaluate")
        return super().evaluate(x, *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        inputs, _ = _split_control(inputs)
        outputs = super().compute_output_spec(inputs, *args, **kwargs)
        if self.feedback_head is None:
            return outputs
        tokens = inputs["token_ids"] if isinstance(inputs, dict) else inputs
        lead = tuple(tokens.shape[:2]) if feedback_lib.reads_per_token(self) else tuple(tokens.shape[:1])
        reading = keras.KerasTensor(lead + (self.feedback_head.feedback_dim,), dtype=self.feedback_head.compute_dtype)
        return feedback_lib.with_feedback(self, outputs, reading)

    def read_feedback(self, inputs, control=None):
        """The feedback head's pooled reading of whole sequences: `[batch, feedback_dim]` (numpy).

        `inputs`: the backbone's inputs (`token_ids`, `padding_mask`, ...); `control` as for `call`."""
        head = self._feedback_head_or_raise("read_feedback")
        x = dict(inputs)
        if control is not None:
            x["control"] = self.resolve_control(control)
        backbone = backbone_of(self)
        outputs = backbone(x)
        if backbone is self:
            return ops.convert_to_numpy(outputs["feedback"])
        return ops.convert_to_numpy(head(feedback_lib.sequence_output(outputs), padding_mask=x.get("padding_mask")))

    def _feedback_head_or_raise(self, where):
        if self.feedback_head is None:
            raise ValueError(
                f"{where}: this {type(self).__name__} has no feedback head. Add one with "
                "`keras_biasinject.add_feedback_head(model, FeedbackHead(feedback_dim))` and train it (see the README)."
            )
        return self.feedback_head

    def get_config(self):
        base_config = with_tied_embeddings(self, super().get_config())
        backbone = base_config.get("backbone")
        if isinstance(backbone, dict) and backbone.get("registered_name") == f"keras_biasinject>{REGISTERED_NAME}":
            base_config["backbone"] = _plain(backbone["config"])  # the task's from_config re-injects it
        adapters = self.adapters
        first = next(iter(adapters.values()))
        several = {} if list(adapters) == [DEFAULT_NAME] else {
            "adapters": [[name, report.config.to_dict()] for name, report in adapters.items()]
        }
        return {
            "base_class": keras.saving.get_registered_name(self._base_class),
            "base_config": base_config,
            "injection": first.config.to_dict(),  # the first adapter's; "adapters" lists each, with its name
            **several,
            "named_controls": {name: list(v) for name, v in self.named_controls.items()},
            "feedback_head": None if self.feedback_head is None else keras.saving.serialize_keras_object(self.feedback_head),
        }

    @classmethod
    def from_config(cls, config):
        from keras_biasinject.rewrite.inject import inject  # a real cycle: inject imports this module

        base_class = keras.saving.get_registered_object(config["base_class"])
        if base_class is None:
            raise ValueError(f"Cannot load an injected {config['base_class']}: that class is not importable here.")
        base = base_class.from_config(config["base_config"])
        for name, injection in config.get("adapters") or [[DEFAULT_NAME, config["injection"]]]:
            model = base = inject(base, InjectionConfig.from_dict(injection), name=name)
        for name, vector in config.get("named_controls", {}).items():
            model.add_control(name, vector)
        if config.get("feedback_head") is not None:
            feedback_lib.add_feedback_head(model, keras.saving.deserialize_keras_object(config["feedback_head"]))
        return model

    @property
    def control_input(self):
        """The `control` input as Keras sees it: `keras.Input((control_dim,), name="control", optional=True)`.

        Absent (None) means the neutral control. A per-token control `[batch, seq, control_dim]` is accepted
        by `call` too; Keras' own `export` serves the per-example shape (`kbi export` serves both)."""
        tensor = self.__dict__.get("_kbi_control_input")
        if tensor is None:
            tensor = keras.Input((self.injection.config.control_dim,), name="control", dtype="float32", optional=True)
            self.__dict__["_kbi_control_input"] = tensor  # a plain attribute: Keras does not track it
        return tensor

    @property
    def input(self):
        """The base model's inputs dict plus `control` (see `control_input`)."""
        inputs = super().input
        return {**inputs, "control": self.control_input} if isinstance(inputs, dict) else inputs

    @property
    def inputs(self):
        """The base model's inputs plus `control`, last (Keras runs the graph on the first ones)."""
        inputs = super().inputs
        return list(inputs) + [self.control_input] if isinstance(super().input, dict) else inputs

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `Model.export` with `control` in the served signature (`[batch, control_dim]` float32).

        The export has to be given a control on every request (a TensorFlow signature has no optional
        inputs); send the neutral control for the base model's answers. For per-token controls, several
        signatures and named controls, use `keras_biasinject.export_saved_model` (`kbi export`)."""
        if input_signature is None and isinstance(super().input, dict):
            input_signature = [{**super().input, "control": self.control_input}]
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    def summary(self, *args, **kwargs):
        print(self.injection)
        print(f"  control input: {tuple(self.control_input.shape)} float32, optional (absent: the neutral control "
              f"{self.injection.config.neutral}); per token: (None, None, {self.injection.config.control_dim})")
        return super().summary(*args, **kwargs)


def _plain(injected_config):
    """The serialized base model inside an injected model's config."""
    cls = keras.saving.get_registered_object(injected_config["base_class"])
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "config": injected_config["base_config"],
        "registered_name": injected_config["base_class"],
    }


class InjectedCausalLM(InjectedModel):
    """Adds `control=` to `CausalLM.generate`."""

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False, control=None,
                 return_feedback=False):
        """`CausalLM.generate` with a control: a vector `[control_dim]` for every prompt, one per
        prompt `[batch, control_dim]`, or stored names (`"positive"`, `["positive", "negative"]`).

        `return_feedback=True` (a model with a feedback head) returns `(outputs, feedback)`: the head's
        reading of each whole generated sequence, `[batch, feedback_dim]` (`[feedback_dim]` for one
        prompt), taken from the hidden states the generation loop computed."""
        if not return_feedback:
            return self._generate(inputs, max_length, stop_token_ids, strip_prompt, control)
        self._feedback_head_or_raise("generate(return_feedback=True)")
        feedback_lib.check_sampler(self)
        with feedback_lib.feedback_sink() as readings:
            outputs = self._generate(inputs, max_length, stop_token_ids, strip_prompt, control)
        feedback = np.concatenate(readings, axis=0)
        return outputs, (feedback[0] if isinstance(outputs, str) else feedback)

    def _generate(self, inputs, max_length, stop_token_ids, strip_prompt, control):
        control = self.resolve_control(control)
        check_finite_control(control, "generate")
        if control is not None:
            self._check_control_width(control, "generate: control")
            self._check_control_rank(control, "generate: control")
        # The control travels in a thread-local slot that the generate function below reads, so that
        # threads generating with different controls on one model never share or swap anything.
        with _generation_control(control):
            extra = {"strip_prompt": True} if strip_prompt else {}  # Phi3CausalLM.generate has no strip_prompt
            return super().generate(inputs, max_length=max_length, stop_token_ids=stop_token_ids, **extra)

    def generate_step(self, inputs, stop_token_ids=None):
        inputs, control = _split_control(inputs)
        with control_scope(control, self._hoisted(control)):
            if self.feedback_head is None or type(self.sampler).__call__ is not keras_hub.samplers.Sampler.__call__:
                return super().generate_step(inputs, stop_token_ids=stop_token_ids)
            return feedback_lib.generate_step_with_feedback(self, inputs, stop_token_ids=stop_token_ids)

    def _hoisted(self, control):
        """{id(adapter): terms} that depend on the control alone, computed once here, outside the decoding
        loop, instead of once per adapter per token (`ControlAdapter.hoist`); None without a control."""
        if control is None or getattr(self, "_kbi_undo", None) is None:
            return None
        control = ops.convert_to_tensor(control, "float32")
        terms = {id(adapter): adapter.hoist(control) for _, adapter in self._kbi_undo.splices}
        return {key: value for key, value in terms.items() if value is not None}

    def make_generate_function(self):
        compiled = feedback_lib.keep_feedback(super().make_generate_function())

        def generate_function(inputs, stop_token_ids=None):
            control = getattr(_generating, "control", None)
            if control is not None:  # `control=` wins over a "control" in token-id inputs
                c = ops.convert_to_tensor(control, "float32")
                if len(c.shape) == 1:  # one control for every prompt: [batch, control_dim]
                    batch = ops.shape(next(iter(inputs.values())))[0]
                    c = ops.broadcast_to(c, (batch, c.shape[-1]))
                inputs = {**inputs, "control": c}
            return compiled(inputs, stop_token_ids=stop_token_ids)

        return generate_function


_generating = threading.local()  # .control: the control of the `generate` call running in this thread


@contextlib.contextmanager
def _generation_control(control):
    previous = getattr(_generating, "control", None)
    _generating.control = control
    try:
        yield
    finally:
        _generating.control = previous


def injected_class(base_class):
    """`Injected<base_class>`, made once and registered so that saved models load."""
    if issubclass(base_class, InjectedModel):
        return base_class
    if base_class not in _classes:
        mixin = InjectedCausalLM if issubclass(base_class, keras_hub.models.CausalLM) else InjectedModel
        attrs = {"__module__": __name__, "_base_class": base_class}
        cls = type(f"Injected{base_class.__name__}", (mixin, base_class), attrs)
        # Every injected class saves under one registered name; `from_config` rebuilds the right one.
        keras.saving.register_keras_serializable(package="keras_biasinject", name=REGISTERED_NAME)(cls)
        _classes[base_class] = cls
    return _classes[base_class]
