"""`save_adapter` / `load_adapter`: only what `inject` added, as a small folder beside the base.

An adapter folder holds
- `adapter_config.json`: the `InjectionConfig`, the named controls, the base model's class and
  backbone config (to refuse a mismatched base), a fingerprint of the adapted base kernels (to warn
  when the base weights differ from those the adapter was trained on), and the weight list;
- `adapter_weights.safetensors`: the adapter weights and those of the extra trainable layers
  (`InjectionConfig.trainable`, e.g. a task head) and of the feedback head, keyed by variable path.

Writing is atomic: a folder is written beside the destination and renamed into place, so a reader
never sees half an adapter, and an existing adapter is replaced only with `overwrite=True`.
"""

import hashlib
import json
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import ops
from safetensors.numpy import load_file, save_file

from keras_biasinject.atomic import atomic_dir
from keras_biasinject.rewrite.config import InjectionConfig
from keras_biasinject.rewrite.feedback import add_feedback_head
from keras_biasinject.rewrite.inject import inject
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import backbone_of, with_tied_embeddings
from keras_biasinject.rewrite.merge import remove, splices_of
from keras_biasinject.rewrite.targets import find_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_weights.safetensors"
FORMAT = "keras_biasinject.adapter/1"
_IGNORED_BACKBONE_KEYS = ("name", "trainable", "dtype")  # may differ between the base it was saved from and now


def _adapter_variables(model):
    """{path: variable} of everything `save_adapter` stores: adapter-owned and extra trainable weights."""
    variables = {v.path: v for _, adapter in splices_of(model, "save_adapter") for v in adapter.own_weights}
    config = model.injection.config
    for layer in find_layers(model, config.trainable) if config.trainable else []:
        variables.update({v.path: v for v in layer.weights})
    if model.feedback_head is not None:
        variables.update({v.path: v for v in model.feedback_head.weights})
    return variables


def _fingerprint(model):
    """sha256 over the adapted base layers' weights (as float32), in splice order."""
    digest = hashlib.sha256()
    for _, adapter in splices_of(model, "save_adapter"):
        for variable in adapter.base_layer.weights:
            digest.update(np.ascontiguousarray(ops.convert_to_numpy(ops.cast(variable, "float32"))).tobytes())
    return digest.hexdigest()


def _backbone_description(model):
    backbone = backbone_of(model)
    cls = backbone._base_class if isinstance(backbone, InjectedModel) else type(backbone)
    raw = backbone.get_config()
    if isinstance(backbone, InjectedModel):
        raw = raw["base_config"]
    config = {k: v for k, v in with_tied_embeddings(backbone, raw).items() if k not in _IGNORED_BACKBONE_KEYS}
    return keras.saving.get_registered_name(cls), json.loads(json.dumps(config, default=str))


def save_adapter(model, path, overwrite=False):
    """Writes the adapter of an injected model (not its base) to the folder `path`; returns `path`.

    Kilobytes to megabytes: the adapter weights, the extra trainable layers' weights, the injection
    config and the named controls. Load it with `load_adapter(base_model, path)`.
    """
    splices = splices_of(model, "save_adapter")
    merged = [a.path for _, a in splices if a.merged]
    if merged:
        raise ValueError(f"save_adapter: adapter {merged[0]!r} is merged; call its `unmerge()` first.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_adapter: {str(path)!r} exists. Pass overwrite=True to replace it.")
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise FileExistsError(
            f"save_adapter: {str(path)!r} exists and is not an adapter folder; it is never replaced. Choose another path."
        )
    variables = _adapter_variables(model)
    arrays = {p: np.ascontiguousarray(ops.convert_to_numpy(ops.cast(v, "float32"))) for p, v in variables.items()}
    backbone_class, backbone_config = _backbone_description(model)
    config = {
        "format": FORMAT,
        "base_class": keras.saving.get_registered_name(model._base_class),
        "backbone_class": backbone_class,
        "backbone_config": backbone_config,
        "injection": model.injection.config.to_dict(),
        "named_controls": {name: list(v) for name, v in model.named_controls.items()},
        "feedback_head": None if model.feedback_head is None else keras.saving.serialize_keras_object(model.feedback_head),
        "base_fingerprint": _fingerprint(model),
        "weights": {p: list(a.shape) for p, a in arrays.items()},
    }

    with atomic_dir(path, overwrite=overwrite) as tmp:  # the old adapter stays whole until the new one is in place
        save_file(arrays, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return str(path)


def _read(path):
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"load_adapter: {str(path)!r} is not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}, "
            "as written by `save_adapter`)."
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load_adapter: {str(path / CONFIG_FILE)!r} is not valid JSON ({error}).") from None
    if config.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {str(path)!r} has format {config.get('format')!r}; this version reads {FORMAT!r}.")
    return config, load_file(str(path / WEIGHTS_FILE))


def _check_base(base_model, config, path):
    if isinstance(base_model, InjectedModel):
        raise ValueError("load_adapter: this model is already injected; pass the plain base model (or `remove` it first).")
    backbone_class, backbone_config = _backbone_description(base_model)
    if backbone_class != config["backbone_class"]:
        raise ValueError(
            f"load_adapter: the adapter at {str(path)!r} was trained on a {config['backbone_class']}; "
            f"got a {backbone_class}. Load the matching base model first."
        )
    saved = config["backbone_config"]
    differs = sorted(k for k in set(saved) | set(backbone_config) if saved.get(k) != backbone_config.get(k))
    if differs:
        detail = ", ".join(f"{k}: adapter {saved.get(k)!r}, model {backbone_config.get(k)!r}" for k in differs[:5])
        raise ValueError(
            f"load_adapter: the base model does not match the adapter at {str(path)!r} ({detail}). "
            "Load the same base checkpoint the adapter was trained on."
        )


def load_adapter(base_model, path):
    """Injects `base_model` as the adapter at `path` describes and loads the adapter's weights.

    Returns the injected model (the same object, as `inject` does). A base of another class or
    architecture raises before anything changes; if the weights then fail to load, the injection
    is undone, so the model is left exactly as it was. Base weights that differ from those the
    adapter was trained on (same architecture) give a warning.
    """
    config, arrays = _read(path)
    _check_base(base_model, config, path)
    injection = InjectionConfig.from_dict(config["injection"])
    model = inject(base_model, injection)
    try:
        if config.get("feedback_head") is not None:
            add_feedback_head(model, keras.saving.deserialize_keras_object(config["feedback_head"]))
        variables = _adapter_variables(model)
        missing = sorted(set(variables) - set(arrays))
        unexpected = sorted(set(arrays) - set(variables))
        if missing or unexpected:
            raise ValueError(
                f"load_adapter: the weights in {str(path)!r} do not fit this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}. Was it saved from a {config['base_class']}?"
            )
        wrong = [(p, arrays[p].shape, tuple(v.shape)) for p, v in variables.items() if arrays[p].shape != tuple(v.shape)]
        if wrong:
            p, got, want = wrong[0]
            raise ValueError(f"load_adapter: weight {p!r} has shape {got} in {str(path)!r}; the model needs {want}.")
        for name, vector in config["named_controls"].items():
            model.add_control(name, vector)
    except Exception:
        remove(model)
        raise
    for p, variable in variables.items():
        variable.assign(arrays[p])
    if _fingerprint(model) != config["base_fingerprint"]:
        warnings.warn(
            f"load_adapter: the base weights under the adapted layers differ from those the adapter at "
            f"{str(path)!r} was trained on (same architecture, other weights); its outputs will differ "
            "from training.",
            stacklevel=2,
        )
    return model
