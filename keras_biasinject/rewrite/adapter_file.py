"""`save_adapter` / `load_adapter`: only what `inject` added, as a small folder beside the base.

An adapter folder holds
- `adapter_config.json`: the `InjectionConfig`, the named controls, the base model's class and
  backbone config (to refuse a mismatched base), a fingerprint of the adapted base kernels (to warn
  when the base weights differ from those the adapter was trained on), and the weight list;
- `adapter_weights.safetensors`: the adapter weights and those of the extra trainable layers
  (`InjectionConfig.trainable`, e.g. a task head) and of the feedback head, keyed by variable path.

Writing is atomic: a folder is written beside the destination and renamed into place, so a reader
never sees half an adapter, and an existing adapter is replaced only with `overwrite=True`. Weights
that are not finite are never written.

Reading checks the whole folder before the model is touched: every key of the config with its type,
finite numbers only, and every tensor of the weights file (names and shapes as the config lists
them, float32, finite). A malformed or tampered folder raises `ValueError` naming the file, the key
or tensor and the value; the model is left exactly as it was.
"""

import hashlib
import json
import re
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import ops
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from keras_biasinject.atomic import atomic_dir
from keras_biasinject.layers.checks import describe, is_finite_number
from keras_biasinject.layers.feedback_head import FeedbackHead
from keras_biasinject.layers.kinds import ADAPTER_KINDS, adapter_weight
from keras_biasinject.rewrite.config import InjectionConfig
from keras_biasinject.rewrite.feedback import add_feedback_head, remove_feedback_head
from keras_biasinject.rewrite.inject import DEFAULT_NAME, inject
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import backbone_of, with_tied_embeddings
from keras_biasinject.rewrite.merge import remove_last_adapter, splices_of
from keras_biasinject.rewrite.targets import find_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_weights.safetensors"
FORMAT = "keras_biasinject.adapter/1"
_IGNORED_BACKBONE_KEYS = ("name", "trainable", "dtype")  # may differ between the base it was saved from and now
_FIX = "Save the adapter again with `save_adapter` (the file was edited, truncated or written by something else)."
_SHAPE_FIELDS = {  # adapter weight -> the (axis, InjectionConfig field) pairs its shape is made of
    "lora_a": ((-1, "rank"),), "lora_b": ((0, "rank"),),
    "control_gain": ((0, "control_dim"), (1, "rank")), "control_kernel": ((0, "control_dim"),),
}
_KEY_TYPES = {  # every key of CONFIG_FILE and the JSON type of its value
    "format": str, "base_class": str, "backbone_class": str, "backbone_config": dict, "injection": dict,
    "named_controls": dict, "feedback_head": (dict, type(None)), "base_fingerprint": str, "weights": dict,
}


def _adapter_variables(model, name):
    """{path: variable} of everything `save_adapter` stores of the adapter `name`: its own weights (keyed by
    the paths they have when it is a model's only adapter), its extra trainable layers' weights and, in a
    model with one adapter, the feedback head's."""
    variables = {_standalone_path(adapter, v): v for _, adapter in splices_of(model, "save_adapter", name)
                 for v in adapter.own_weights}
    config = model.adapters[name].config
    for layer in find_layers(model, config.trainable) if config.trainable else []:
        variables.update({v.path: v for v in layer.weights})
    if model.feedback_head is not None and len(model.adapters) == 1:
        variables.update({v.path: v for v in model.feedback_head.weights})
    return variables


def _standalone_path(adapter, variable):
    """`variable`'s path as if `adapter` were its model's only adapter: a second adapter's layer is named
    `query_b_lora_bias` beside the first's `query_lora_bias`; its file says `query_lora_bias`, so that it
    loads onto a plain base as well as beside other adapters."""
    scope, _, weight = variable.path.rpartition("/")
    parent, _, segment = scope.rpartition("/")
    if segment != adapter.name:
        return variable.path
    return "/".join(part for part in (parent, type(adapter).default_name(adapter.base_layer), weight) if part)


def _fingerprint(model, name):
    """sha256 over the adapted base layers' weights (as float32) of the adapter `name`, in splice order."""
    digest = hashlib.sha256()
    for _, adapter in splices_of(model, "save_adapter", name):
        for variable in adapter.base_layer.weights:
            digest.update(np.ascontiguousarray(ops.convert_to_numpy(ops.cast(variable, "float32"))).tobytes())
    return digest.hexdigest()


def _adapter_name(model, name, caller):
    """The adapter of `model` that `name` means: `name` itself, or with None the model's only adapter."""
    names = list(model.adapters)
    if name is None and len(names) == 1:
        return names[0]
    if name is None:
        raise ValueError(f"{caller}: this model has {len(names)} adapters {names}; pass `name=` to say which to save "
                         "(save each to its own folder; `model.save('x.keras')` keeps them all).")
    if name not in names:
        raise ValueError(f"{caller}: this model has no adapter named {name!r}; its adapters are {names}.")
    return name


def _own_named_controls(model, name):
    """The named controls `save_adapter` writes for the adapter `name`: those stored as `<name>/<control>`
    (by `load_adapter(..., name=name)`), cut to its part of the control; with one adapter, every other too."""
    start, stop = model.control_layout[name]
    prefix, single = f"{name}/", len(model.adapters) == 1
    own = {key: list(vector) for key, vector in model.named_controls.items() if single and not key.startswith(prefix)}
    own.update({key[len(prefix):]: list(vector[start:stop]) for key, vector in model.named_controls.items()
                if key.startswith(prefix)})
    return own


def _backbone_description(model):
    backbone = backbone_of(model)
    cls = backbone._base_class if isinstance(backbone, InjectedModel) else type(backbone)
    raw = backbone.get_config()
    if isinstance(backbone, InjectedModel):
        raw = raw["base_config"]
    config = {k: v for k, v in with_tied_embeddings(backbone, raw).items() if k not in _IGNORED_BACKBONE_KEYS}
    return keras.saving.get_registered_name(cls), json.loads(json.dumps(config, default=str))


def save_adapter(model, path, overwrite=False, name=None):
    """Writes the adapter of an injected model (not its base) to the folder `path`; returns `path`.

    Kilobytes to megabytes: the adapter weights, the extra trainable layers' weights, the injection
    config and the named controls. Load it with `load_adapter(base_model, path)`.

    A model with several adapters saves one at a time: `name` says which. The folder is the same as
    for that adapter alone (its own control, its named controls stored as `<name>/<control>`), so it
    loads onto a plain base or beside other adapters (`load_adapter(model, path, name=...)`).
    """
    splices_of(model, "save_adapter")  # an injected model that `inject` returned
    name = _adapter_name(model, name, "save_adapter")
    splices = splices_of(model, "save_adapter", name)
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
    variables = _adapter_variables(model, name)
    arrays = {p: np.ascontiguousarray(ops.convert_to_numpy(ops.cast(v, "float32"))) for p, v in variables.items()}
    bad = [p for p, a in arrays.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(
            f"save_adapter: weight {bad[0]!r} holds NaN or inf values ({len(bad)} weight(s) do); nothing was written. "
            "Training diverged: lower the learning rate, check the data and controls for non-finite values, and train again."
        )
    backbone_class, backbone_config = _backbone_description(model)
    config = {
        "format": FORMAT,
        "base_class": keras.saving.get_registered_name(model._base_class),
        "backbone_class": backbone_class,
        "backbone_config": backbone_config,
        "injection": model.adapters[name].config.to_dict(),
        "named_controls": _own_named_controls(model, name),
        "feedback_head": None if model.feedback_head is None or len(model.adapters) > 1
        else keras.saving.serialize_keras_object(model.feedback_head),
        "base_fingerprint": _fingerprint(model, name),
        "weights": {p: list(a.shape) for p, a in arrays.items()},
    }

    with atomic_dir(path, overwrite=overwrite) as tmp:  # the old adapter stays whole until the new one is in place
        (tmp / WEIGHTS_FILE).write_bytes(save(arrays))  # not `save_file`: it makes the file 0600 whatever the umask
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return str(path)


def _read(path):
    """(config, InjectionConfig, feedback head or None, {path: array}) of the adapter folder at `path`,
    every part checked; nothing of a model is touched."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"load_adapter: {str(path)!r} is not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}, "
            "as written by `save_adapter`)."
        )
    file = str(path / CONFIG_FILE)
    config = _check_keys(_parse_json(path / CONFIG_FILE), file)
    injection = _injection_of(config, file)
    _check_named_controls(config["named_controls"], injection.control_dim, file)
    _check_declared_shapes(injection, config["weights"], file)
    head = _feedback_head_of(config["feedback_head"], file)
    return config, injection, head, _read_weights(path / WEIGHTS_FILE, config["weights"], file)


def _parse_json(file):
    """The JSON object in `file`: UTF-8, valid, not absurdly nested, every number finite."""
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"load_adapter: {str(file)!r} is not UTF-8 text (byte {error.start}). {_FIX}") from None
    except ValueError as error:  # invalid JSON, or an integer of more than 4,300 digits
        raise ValueError(f"load_adapter: {str(file)!r} is not valid JSON ({error}). {_FIX}") from None
    except RecursionError:
        raise ValueError(f"load_adapter: {str(file)!r} nests its JSON too deeply to read. {_FIX}") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {str(file)!r} must hold a JSON object; got a {type(config).__name__}. {_FIX}")
    key, value = _first_non_finite(config)
    if key is not None:
        raise ValueError(f"load_adapter: {str(file)!r}: key {key!r} must be a finite number. Got {describe(value)} "
                         f"(NaN, inf and integers beyond the float range, 1.8e308, are refused). {_FIX}")
    return config


def _first_non_finite(tree):
    """(dotted key, value) of the first NaN, inf or integer beyond the float range (`float()` raises
    OverflowError on it) in a parsed JSON tree, else (None, None); no recursion, so a deep tree cannot
    overflow the stack."""
    stack = [("", tree)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not is_finite_number(value):
            return key, value
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in items)
    return None, None


def _check_keys(config, file):
    """`config` if it is in this format and holds exactly the keys `save_adapter` writes, each of its type."""
    if config.get("format") != FORMAT:
        raise ValueError(
            f"load_adapter: {str(file)!r} has format {_short(config.get('format'))}; this version reads {FORMAT!r}."
        )
    missing, extra = sorted(set(_KEY_TYPES) - set(config)), sorted(set(config) - set(_KEY_TYPES))
    if missing or extra:
        raise ValueError(
            f"load_adapter: {str(file)!r} has missing key(s) {missing} and unexpected key(s) {extra}; an adapter "
            f"config holds exactly {sorted(_KEY_TYPES)}. {_FIX}"
        )
    for key, kind in _KEY_TYPES.items():
        if not isinstance(config[key], kind):
            raise ValueError(
                f"load_adapter: {str(file)!r}: key {key!r} must be a JSON {_json_type(kind)}. "
                f"Got {_short(config[key])}. {_FIX}"
            )
    if not re.fullmatch(r"[0-9a-f]{64}", config["base_fingerprint"]):
        raise ValueError(f"load_adapter: {str(file)!r}: key 'base_fingerprint' must be a sha256 hex digest. "
                         f"Got {_short(config['base_fingerprint'])}. {_FIX}")
    for name, shape in config["weights"].items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"load_adapter: {str(file)!r}: key 'weights.{name}' must be a shape (a list of sizes). "
                             f"Got {_short(shape)}. {_FIX}")
    return config


def _json_type(kind):
    names = {str: "string", dict: "object", type(None): "null"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _injection_of(config, file):
    try:
        return InjectionConfig.from_dict(config["injection"])
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(
            f"load_adapter: {str(file)!r}: key 'injection' is not a valid InjectionConfig: {error} {_FIX}"
        ) from None


def _check_named_controls(controls, control_dim, file):
    for name, vector in controls.items():
        numbers = isinstance(vector, list) and all(is_finite_number(v) for v in vector)
        if not numbers or len(vector) != control_dim:
            raise ValueError(
                f"load_adapter: {str(file)!r}: key 'named_controls.{name}' must be {control_dim} number(s) "
                f"(control_dim={control_dim}). Got {_short(vector)}. {_FIX}"
            )


def _check_declared_shapes(injection, shapes, file):
    """Checks the fields of `injection` that size the adapter weights (kind, rank, control_dim) against
    the shapes the config lists (which the weights file must then match), before `inject` allocates
    anything: a tampered `rank` of 10**6 would otherwise allocate gigabytes first. Every such field of
    the kind must be fixed by at least one listed weight."""
    kind = ADAPTER_KINDS[injection.kind]
    fixed = set()
    for path, shape in shapes.items():
        found = adapter_weight(path)
        if found is None:  # an extra trainable layer's or the feedback head's weight
            continue
        if found[0] is not kind:
            raise ValueError(f"load_adapter: {str(file)!r}: key 'injection.kind' is {injection.kind!r}, but key "
                             f"'weights' lists {_short(path)}, a weight of kind {found[0].kind!r}. {_FIX}")
        for axis, field in _SHAPE_FIELDS.get(found[1], ()):
            value = getattr(injection, field)
            if len(shape) <= max(axis, -axis - 1) or shape[axis] != value:
                raise ValueError(f"load_adapter: {str(file)!r}: key 'injection.{field}' is {describe(value)}, but key "
                                 f"'weights.{path}' lists shape {_short(shape)}. {_FIX}")
            fixed.add(field)
    used = {field for name in kind.weight_names for _, field in _SHAPE_FIELDS.get(name, ())}
    if used - fixed:
        raise ValueError(f"load_adapter: {str(file)!r}: key 'weights' lists no weight of an adapter of kind "
                         f"{injection.kind!r}, so 'injection.{sorted(used - fixed)[0]}' cannot be checked. {_FIX}")


def _feedback_head_of(serialized, file):
    if serialized is None:
        return None
    try:
        head = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    except Exception as error:  # a tampered config can fail anywhere in Keras' deserialization
        raise ValueError(f"load_adapter: {str(file)!r}: key 'feedback_head' does not describe a FeedbackHead "
                         f"({type(error).__name__}: {_short(str(error))}). {_FIX}") from None
    if not isinstance(head, FeedbackHead):
        raise ValueError(f"load_adapter: {str(file)!r}: key 'feedback_head' must describe a FeedbackHead. "
                         f"Got a {type(head).__name__}. {_FIX}")
    return head


def _read_weights(weights_file, shapes, config_file):
    """{path: float32 array} from `weights_file`: exactly the tensors and shapes the config lists, finite."""
    file = str(weights_file)
    if not weights_file.is_file():
        raise ValueError(f"load_adapter: {file!r} is missing; {str(config_file)!r} needs it. {_FIX}")
    try:
        arrays = load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"load_adapter: {file!r} is truncated or corrupt ({_short(str(error))}). {_FIX}") from None
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ValueError(f"load_adapter: {file!r} lacks tensor(s) {missing[:3]} and has unexpected tensor(s) "
                         f"{extra[:3]}, against the list in {str(config_file)!r}. {_FIX}")
    for name, array in arrays.items():
        if array.dtype != np.float32:
            raise ValueError(f"load_adapter: {file!r}: tensor {name!r} has dtype {array.dtype}; adapter weights are "
                             f"float32 (they are never cast). {_FIX}")
        if list(array.shape) != shapes[name]:
            raise ValueError(f"load_adapter: {file!r}: tensor {name!r} has shape {list(array.shape)}; "
                             f"{str(config_file)!r} lists {shapes[name]}. {_FIX}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"load_adapter: {file!r}: tensor {name!r} holds NaN or inf values. {_FIX}")
    return {name: arrays[name] for name in shapes}  # in the config's order: the order they were saved in


def _check_base(base_model, config, path, name, head):
    if isinstance(base_model, InjectedModel):
        names = list(base_model.adapters)
        if name in names:
            raise ValueError(
                f"load_adapter: the model already has an adapter named {name!r} (its adapters: {names}); two adapters "
                f"cannot share a name. Pass another name, e.g. load_adapter(model, {str(path)!r}, name='{name}_2')."
            )
        if head is not None and base_model.feedback_head is not None:
            raise ValueError(f"load_adapter: the adapter at {str(path)!r} brings a feedback head, and the model has one "
                             "already. Take it off first (`remove_feedback_head(model)`), or load onto the plain base.")
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


def load_adapter(base_model, path, name=None):
    """Injects `base_model` as the adapter at `path` describes and loads the adapter's weights.

    Returns the injected model (the same object, as `inject` does). The whole folder is read and
    checked first, then the base: a malformed file or a base of another class or architecture raises
    before anything changes; if the weights then do not fit the injected model, the injection is
    undone, so the model is left exactly as it was. Base weights that differ from those the adapter
    was trained on (same architecture) give a warning.

    Several adapters: load each under its own `name` (`load_adapter(model, "a/", name="a")`, then
    `name="b"` on the returned model): the model's control becomes theirs side by side (see
    `model.control_layout`, `model.mix`). The adapter's named controls are stored as `<name>/<control>`
    (with the other adapters neutral) when `name` is given, as they are otherwise.
    """
    config, injection, head, arrays = _read(path)
    adapter_name = DEFAULT_NAME if name is None else name
    _check_base(base_model, config, path, adapter_name, head)
    had_head = getattr(base_model, "feedback_head", None) is not None
    model = _inject_from_file(base_model, injection, path, adapter_name)
    try:
        if head is not None:
            add_feedback_head(model, head)
        variables = _adapter_variables(model, adapter_name)
        arrays = _renumbered(variables, arrays)
        _check_fit(variables, arrays, config, path)
        start, stop = model.control_layout[adapter_name]
        for control, vector in config["named_controls"].items():
            combined = model._neutral_vector()
            combined[start:stop] = vector
            model.add_control(control if name is None else f"{name}/{control}", combined)
    except Exception:
        if head is not None and model.feedback_head is not None and not had_head:
            remove_feedback_head(model)
        remove_last_adapter(model)
        raise
    for p, variable in variables.items():
        variable.assign(arrays[p])
    if _fingerprint(model, adapter_name) != config["base_fingerprint"]:
        warnings.warn(
            f"load_adapter: the base weights under the adapted layers differ from those the adapter at "
            f"{str(path)!r} was trained on (same architecture, other weights); its outputs will differ "
            "from training.",
            stacklevel=2,
        )
    return model


def _inject_from_file(base_model, injection, path, name):
    """`inject(base_model, injection, name=name)`, with an injection that does not apply named after the file."""
    try:
        return inject(base_model, injection, name=name)
    except (ValueError, TypeError, OverflowError) as error:  # `inject` leaves the model as it was
        raise ValueError(
            f"load_adapter: the 'injection' in {str(Path(path) / CONFIG_FILE)!r} does not apply to this model: {error}"
        ) from None


def _renumbered(variables, arrays):
    """`arrays` keyed by this model's paths when the two differ only in numbers, else as they are.

    KerasHub names some sublayers by a process-wide counter (`qwen_sparse_moe_block` in the process
    that saved, `qwen_sparse_moe_block_2` in the one that loads). Paths equal up to their segments'
    `_<number>` endings are paired in splice order, which the injection config fixes (block by block);
    `_check_fit` then checks every shape."""
    if set(variables) == set(arrays):
        return arrays
    ours, theirs = [_unnumbered(p) for p in variables], [_unnumbered(p) for p in arrays]
    if ours != theirs:
        return arrays
    return {mine: arrays[saved] for mine, saved in zip(variables, arrays)}


def _unnumbered(path):
    """`path` without the `_<number>` ending of each segment."""
    return re.sub(r"_\d+(/|$)", r"\1", path)


def _check_fit(variables, arrays, config, path):
    """Raises unless `arrays` are exactly the injected model's adapter `variables`, shape for shape."""
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
