"""The two models behind the server: `LoadedExport`, one version folder of a SavedModel export,
loaded, which answers predicts and steps session states; and `AdaptableModel`, the Keras model that
export was made from (`kbi serve --source`), which `:adapt` trains and exports as the next version.
"""

import json
import threading
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def is_version(name):
    """Whether folder `name` is a version number: ASCII digits only ("²" is a digit to `str.isdigit`, not to `int`)."""
    return name.isascii() and name.isdigit()


def find_version(export_dir):
    """(model name, version, folder): `<base>/<name>` (highest version) or `<base>/<name>/<version>`."""
    path = Path(export_dir)
    if (path / "saved_model.pb").is_file() and is_version(path.name):
        return path.parent.name, int(path.name), path
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and is_version(p.name)) if path.is_dir() else []
    if not versions:
        raise FileNotFoundError(
            f"serve: {str(export_dir)!r} holds no version folder (<name>/<version>/saved_model.pb). "
            "Make one with `kbi export RUN --out BASE --name NAME` and serve BASE/NAME."
        )
    return path.name, versions[-1], path / str(versions[-1])


class LoadedExport:
    """One version of a SavedModel export (`<base>/<name>/<version>/`, see `find_version`), loaded
    with `tf.saved_model.load`: its signatures and their input specs, the widths its `feedback_step`
    signature gives sessions (`control_dim`, `feedback_dim`; None without one) and what
    `export_saved_model` wrote beside it (`extra`; `head`, the feedback head's description;
    `vocabulary_size`, when the export recorded it)."""

    def __init__(self, export_dir):
        self.name, self.version, self.path = find_version(export_dir)
        self.loaded = tf.saved_model.load(str(self.path))
        self.signatures = dict(self.loaded.signatures)
        self.specs = {name: fn.structured_input_signature[1] for name, fn in self.signatures.items()}
        feedback = self.specs.get("feedback_step")
        self.control_dim = int(feedback["state"].shape[-1]) if feedback else None
        self.feedback_dim = int(feedback["feedback"].shape[-1]) if feedback else None
        path = self.path / "assets.extra" / "keras_biasinject.json"
        self.extra = json.loads(path.read_text()) if path.is_file() else {}
        # {"feedback_dim", "pooling", "activation", "reading_range": [low, high] (null: unbounded)} or None
        self.head = self.extra.get("feedback_head")
        vocabulary_size = self.extra.get("vocabulary_size")  # token ids must lie below it; None: unknown
        self.vocabulary_size = vocabulary_size if type(vocabulary_size) is int and vocabulary_size > 0 else None
        self.task = self.extra.get("task")  # "causal_lm" or "classifier" when the export kept its preprocessor
        self.neutral_control = self.extra.get("neutral_control")  # the control text routes default to
        self._preprocessor = None
        self._preprocessor_lock = threading.Lock()

    def preprocessor(self):
        """The model's own KerasHub preprocessor, kept beside the export (`assets.extra/preprocessor`), loaded
        at first use; None for an export without one (made before text routes, or from a bare backbone)."""
        from keras_biasinject.export.saved_model import PREPROCESSOR_FOLDER

        folder = self.path / "assets.extra" / PREPROCESSOR_FOLDER
        if not folder.is_dir():
            return None
        with self._preprocessor_lock:
            if self._preprocessor is None:
                import keras_hub  # noqa: F401  (lazy: only the text routes need it; registers its classes)

                # As KerasHub's preset loader does, without its need for the backbone's config.json beside it.
                config = json.loads((folder / "preprocessor.json").read_text())
                tokenizer = config["config"]["tokenizer"]["config"]
                if isinstance(tokenizer.get("misc_special_tokens"), list):  # a set in Llama 3's tokenizer; JSON has lists
                    tokenizer["misc_special_tokens"] = set(tokenizer["misc_special_tokens"])
                preprocessor = keras.saving.deserialize_keras_object(config)
                preprocessor.load_preset_assets(str(folder))
                if getattr(preprocessor, "add_start_token", True) is False:  # `load` turned it off (the config keeps
                    from keras_biasinject.models.load import drop_start_token  # that, the packer needs telling again)

                    drop_start_token(preprocessor)
                self._preprocessor = preprocessor
        return self._preprocessor

    def specs_out(self, signature):
        """{output name: TensorSpec} of `signature`."""
        return dict(self.signatures[signature].structured_outputs)

    def feedback_step(self, state, feedback, elapsed):
        """(new state, control) after `elapsed` seconds of decay from `state` and then `feedback`."""
        out = self.signatures["feedback_step"](
            state=tf.constant([state], tf.float32), feedback=tf.constant([feedback], tf.float32),
            elapsed=tf.constant([elapsed], tf.float32),
        )
        return out["new_state"].numpy()[0].tolist(), out["control"].numpy()[0].tolist()

    def metadata(self):
        """TF Serving's answer to `GET /v1/models/<name>/metadata`: every signature's inputs and outputs."""
        def describe(specs):
            return {k: {"dtype": s.dtype.name, "shape": [-1 if d is None else d for d in s.shape]} for k, s in specs.items()}

        return {
            "model_spec": {"name": self.name, "version": str(self.version)},
            "metadata": {"signature_def": {
                name: {"inputs": describe(self.specs[name]),
                       "outputs": describe(fn.structured_outputs)}
                for name, fn in self.signatures.items()
            }},
        }

    def feedback_layer(self):
        """The `DecayFeedback` layer kept beside this version (`assets.extra/keras_biasinject.json`,
        written by `export_saved_model`), or None; a version published by `:adapt` keeps it."""
        data = self.extra.get("feedback")
        if data is None:
            return None
        layer = keras.saving.deserialize_keras_object(data["config"])
        if not layer.built:
            layer.build()
        layer.set_weights([np.asarray(w, "float32") for w in data["weights"]])
        return layer


class AdaptableModel:
    """The Keras model an export was made from, which `:adapt` trains: given as a run folder or a
    .keras file (`kbi serve --source`) and loaded at the first adapt. One adapt at a time (`lock`)."""

    def __init__(self, source):
        self.source = source  # the run folder (with report.json) or .keras file
        self.model = None  # the Keras model, once `keras_model()` has loaded it
        self.lock = threading.Lock()

    def keras_model(self):
        """The Keras model behind `source`, loaded on the first call (FileNotFoundError if it is neither)."""
        if self.model is None:
            # lazy: loading a model pulls in keras_hub; the server starts without it
            from keras_biasinject.recipes.run_folder import load_model_source

            self.model = load_model_source(self.source)
        return self.model
