"""`export_saved_model`: a model as a TensorFlow SavedModel that TF Serving runs as it is.

The export goes to `<base_dir>/<name>/<version>/`, TF Serving's layout, and holds only TensorFlow
ops: it loads with `tf.saved_model.load` in a process that has neither keras_biasinject nor
keras_hub. Its signatures (`serve`, `serve_named`, `generate`, `feedback_step`) are made by
`build_archive` in `endpoints.py`, which describes them. With `control=` fixed at export, the update
is merged into the weights and `serve` has no `control` input: the base model's cost exactly.

`assets.extra/keras_biasinject.json` (TF Serving ignores that folder) keeps what a server needs
beyond the signatures: a `DecayFeedback`'s config and weights (so that it can publish a new version
after self-tuning), a feedback head's `feedback_dim`, `pooling`, `activation` and reading range
(so that `kbi serve --loop self` knows there is a reading to steer by and which targets it can reach),
the backbone's `vocabulary_size` (so that a server refuses token ids beyond it) and, for `kbi
serve`'s text routes, the task, the neutral control and the learned-position limit. Beside it,
`assets.extra/preprocessor/` holds the model's own KerasHub preprocessor as a preset (tokenizer
included), when the model has one.

Every check runs before the archive is built or anything is written: the name, the version (a
positive int64, TF Serving's type), a `DecayFeedback` as wide as the model's control (and its
feedback head), and a destination this process can write in. `write_version` publishes the folder
with `atomic_dir`, in one rename: an interrupted export leaves no version that a server would load,
and an existing version is replaced only with `overwrite=True`. The partial folders that killed
exports left under `<base_dir>/<name>` are removed by the next export there once their writer is
gone (its writer's lock is free, or without a lock file an hour untouched; see
`keras_biasinject.atomic`).
"""

import inspect
import json
import os
import tempfile
from pathlib import Path

import keras
import keras_hub
import numpy as np

from keras_biasinject.atomic import atomic_dir, recover_all
from keras_biasinject.export.endpoints import build_archive
from keras_biasinject.layers import DecayFeedback
from keras_biasinject.layers.checks import check_positive_int
from keras_biasinject.rewrite.injected_model import InjectedModel
from keras_biasinject.rewrite.kerashub import preprocessor_detached
from keras_biasinject.rewrite.merge import merge

METADATA_FILE = "keras_biasinject.json"  # in the version's assets.extra/
MAX_VERSION = 2**63 - 1  # TF Serving reads version folder names as int64


def export_saved_model(model, base_dir, name="model", version=None, *, control=None, feedback=None, overwrite=False):
    """Exports `model` to `<base_dir>/<name>/<version>/` and returns that path.

    Args:
        model: a KerasHub Task or Backbone, injected or plain; with a feedback head, `serve` and
            `generate` also return its reading, `feedback` `[batch, feedback_dim]`.
        base_dir: TF Serving's model base path.
        name: the model name in TF Serving's URLs (`/v1/models/<name>:predict`).
        version: an integer from 1 to 2**63 - 1 (TF Serving reads int64); default: one more than the highest there.
        control: a control vector or stored name to merge into the weights (injected models only);
            the export then has no `control` input and costs what the base costs.
        feedback: a `DecayFeedback` whose `feedback_step` signature to add.
        overwrite: replace an existing version folder.
    """
    final = version_folder(base_dir, name, version, overwrite)
    check_feedback_fits(model, feedback)
    if control is not None:
        if not isinstance(model, InjectedModel):
            raise ValueError("export_saved_model: `control` merges an adapter's update; this model has no adapters (use `inject`).")
        if model.feedback_head is not None:
            raise ValueError(
                f"export_saved_model: `control` merges the update into a plain {model._base_class.__name__}, which cannot "
                "carry the feedback head. Export without `control` to keep the head's `feedback` output, or take the "
                "head off first: `head = remove_feedback_head(model)`, export, then `add_feedback_head(model, head)`."
            )
        model = merge(model, control)
    archive = build_archive(model, feedback)
    metadata = export_metadata(feedback, getattr(model, "feedback_head", None), vocabulary_size_of(model))
    if isinstance(model, InjectedModel):  # what a server sends when a text request names no control
        metadata["neutral_control"] = [float(v) for v in model._neutral_vector()]
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        metadata["task"] = "causal_lm" if isinstance(model, keras_hub.models.CausalLM) else "classifier"
    backbone = model.backbone if isinstance(model, keras_hub.models.Task) else model
    if isinstance(getattr(backbone, "max_sequence_length", None), int):  # learned positions: no token beyond them
        metadata["max_sequence_length"] = backbone.max_sequence_length
    extra = {METADATA_FILE: json.dumps(metadata)} if metadata else {}
    with preprocessor_detached(model):  # tokenizers need tensorflow-text ops; the export takes token ids
        write_version(archive, final, overwrite=overwrite, extra=extra, preprocessor=preprocessor)
    return str(final)


def next_version(base_dir, name):
    """1 + the highest numeric name under `<base_dir>/<name>` (1 when there is none): every entry whose
    name is all digits counts, a file as much as a folder, since either blocks that version."""
    folder = Path(base_dir) / name
    versions = [int(p.name) for p in folder.iterdir() if p.name.isascii() and p.name.isdigit()] if folder.is_dir() else []
    return max(versions, default=0) + 1


def version_folder(base_dir, name, version=None, overwrite=False):
    """`<base_dir>/<name>/<version>` after checking the name, the destination and the version (default:
    the next one); removes the partial folders that killed exports left there."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"export_saved_model: `name` must be a plain folder name. Got name={name!r}.")
    check_writable(Path(base_dir) / name)
    recover_all(Path(base_dir) / name)
    if version is None:
        version = next_version(base_dir, name)
    version = check_version(version)
    final = Path(base_dir) / name / str(version)
    if final.exists() and not final.is_dir():
        raise ValueError(
            f"export_saved_model: {str(final)!r} is a file, not a version folder. Move it away, or export another version."
        )
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"export_saved_model: {str(final)!r} exists; TF Serving may be serving it. Pass overwrite=True "
            "(kbi export --overwrite) to replace it, or export a new version."
        )
    return final


def check_version(version):
    """`version` as an int if TF Serving can load it (1 to 2**63 - 1, int64), else ValueError."""
    version = check_positive_int(version, "version", "export_saved_model")  # bools refused, numpy integers taken
    if version > MAX_VERSION:
        raise ValueError(
            f"export_saved_model: `version` must be at most 2**63 - 1 (TF Serving reads versions as int64). "
            f"Got version={version!r}. Pass a smaller version, or none for the next one."
        )
    return version


def check_writable(folder, owner="export_saved_model"):
    """Raises ValueError unless `folder` is, or can become, a folder this process writes in: its nearest
    existing ancestor must be a folder that takes a new file. Tried, not asked: `os.access` says yes to
    root even on a read-only file system."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        below = "" if existing == folder else f", so {str(folder)!r} cannot be a folder"
        raise ValueError(
            f"{owner}: {str(existing)!r} is a file{below}. Choose another destination (kbi export --out), or move the file away."
        )
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".kbi-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(
            f"{owner}: cannot write in {str(existing)!r} ({error.strerror or error}). Choose a folder you can "
            "write in (kbi export --out), or make this one writable."
        ) from None


def check_feedback_fits(model, feedback):
    """Raises ValueError when `feedback`'s control or feedback width differs from the model's control or
    feedback head: its `feedback_step` would hand sessions controls the model cannot take."""
    if not isinstance(feedback, DecayFeedback):
        return  # None, or a wrong type that `build_archive` names
    if isinstance(model, InjectedModel) and feedback.control_dim != model.injection.config.control_dim:
        raise ValueError(
            f"export_saved_model: the DecayFeedback has control_dim={feedback.control_dim}, but the model's control "
            f"has {model.injection.config.control_dim} value(s). Build it with "
            f"DecayFeedback(control_dim={model.injection.config.control_dim}, ...)."
        )
    head = getattr(model, "feedback_head", None)
    if head is not None and feedback.feedback_dim != head.feedback_dim:
        raise ValueError(
            f"export_saved_model: the DecayFeedback has feedback_dim={feedback.feedback_dim}, but the model's feedback "
            f"head reads {head.feedback_dim} value(s). Build it with DecayFeedback(feedback_dim={head.feedback_dim}, ...)."
        )


def vocabulary_size_of(model):
    """The token vocabulary of a KerasHub model's backbone (a Task's `backbone`), or None without one."""
    backbone = model.backbone if isinstance(model, keras_hub.models.Task) else model
    size = getattr(backbone, "vocabulary_size", None)
    return int(size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else None


PREPROCESSOR_FOLDER = "preprocessor"  # in the version's assets.extra/: the model's own tokenizer, a KerasHub preset


def write_version(archive, final, overwrite=False, extra=None, preprocessor=None):
    """Writes `archive` to the folder `final` in one rename, with `extra` ({file name: text}) and the
    model's KerasHub `preprocessor` (as a preset, for `kbi serve`'s text routes) in `assets.extra/`,
    which TF Serving ignores."""
    with atomic_dir(final, overwrite=overwrite) as tmp:  # `.<version>.partial-XXXX`: TF Serving skips it
        archive.write_out(str(tmp), verbose=False)  # an existing empty folder is fine for write_out
        if extra or preprocessor is not None:
            (tmp / "assets.extra").mkdir(exist_ok=True)
        for file_name, text in (extra or {}).items():
            (tmp / "assets.extra" / file_name).write_text(text)
        if preprocessor is not None:
            preprocessor.save_to_preset(str(tmp / "assets.extra" / PREPROCESSOR_FOLDER))
            complete_tokenizer_config(tmp / "assets.extra" / PREPROCESSOR_FOLDER / "preprocessor.json", preprocessor.tokenizer)


def complete_tokenizer_config(path, tokenizer):
    """Adds to the saved preprocessor config the special tokens that KerasHub 0.32's Llama 3
    tokenizer takes but leaves out of `get_config` (`bos_token`, `eos_token`, `misc_special_tokens`):
    without them it reloads with Meta's defaults, which a converted tokenizer (SmolLM2's) lacks."""
    params = inspect.signature(type(tokenizer).__init__).parameters
    saved = json.loads(path.read_text())
    config = saved["config"]["tokenizer"]["config"]
    attrs = getattr(tokenizer, "_special_token_attrs", [])
    found = {"bos_token": getattr(tokenizer, "start_token", None) if "start_token" in attrs else None,
             "eos_token": getattr(tokenizer, "end_token", None) if "end_token" in attrs else None,
             "misc_special_tokens": sorted(getattr(tokenizer, a) for a in attrs if a.startswith("special_token_"))}
    missing = {k: v for k, v in found.items() if k in params and k not in config}
    if missing:
        config.update(missing)
        path.write_text(json.dumps(saved, indent=4))


def export_metadata(feedback=None, head=None, vocabulary_size=None):
    """What `METADATA_FILE` holds ({} for none): "feedback", a `DecayFeedback`'s config and weights,
    so that a server can re-export after self-tuning (serving/adapt.py); "feedback_head", what a
    serving loop needs to know of the head (`head_metadata`); "vocabulary_size", the number of token
    ids the model embeds (a server refuses ids at or beyond it)."""
    metadata = {} if vocabulary_size is None else {"vocabulary_size": vocabulary_size}
    if feedback is not None:
        metadata["feedback"] = {
            "config": keras.saving.serialize_keras_object(feedback),
            "weights": [np.asarray(w).tolist() for w in feedback.get_weights()],
        }
    if head is not None:
        metadata["feedback_head"] = head_metadata(head)
    return metadata


def head_metadata(head):
    """A `FeedbackHead`'s width, pooling, activation and reading range `[low, high]` (an open interval;
    null for an unbounded side, which JSON cannot write as infinity)."""
    low, high = head.reading_range
    return {
        "feedback_dim": head.feedback_dim,
        "pooling": head.pooling,
        "activation": head.activation,
        "reading_range": [None if np.isinf(low) else low, None if np.isinf(high) else high],
    }
