"""The model behind a finished run folder (or a `.keras` file): one loader for `kbi evaluate`,
`kbi export`, `kbi serve --source` and the benchmarks.

A run folder is what `finetune` writes: `report.json` (which holds the recipe), `adapter/` (the
trained bias injection, written by `save_adapter`) and, for classification, `classifier.keras`.
"""

import json
from pathlib import Path

import keras

from keras_biasinject.models.load import load
from keras_biasinject.recipes.config import Recipe
from keras_biasinject.recipes.datasets import num_classes
from keras_biasinject.rewrite.adapter_file import load_adapter

LOAD_TASK = {"classification": "classifier", "causal_lm": "causal_lm"}  # recipe task -> `load(task=)`


def base_model(recipe, dropout=None):
    """A freshly loaded base model for `recipe` (the task `load` makes, at its sequence length)."""
    extra = {} if dropout is None else {"dropout": float(dropout)}
    if recipe.task == "classification":
        extra["num_classes"] = num_classes(recipe)
    return load(recipe.model.spec, task=LOAD_TASK[recipe.task], sequence_length=recipe.model.sequence_length, **extra)


def run_recipe(run):
    """The `Recipe` a run folder was made with (from its `report.json`)."""
    path = Path(run) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} has no report.json; give a folder written by `kbi finetune`.")
    return Recipe(**json.loads(path.read_text())["recipe"])


def load_run_model(run):
    """(recipe, the run's base model with its trained adapter), as `kbi finetune` saved it."""
    recipe = run_recipe(run)
    adapter = Path(run) / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{str(run)!r} has no adapter/; the run did not finish method 'bias_injection'.")
    return recipe, load_adapter(base_model(recipe), adapter)


def load_model_source(source):
    """The Keras model behind `source`: a run folder (with report.json) or a `.keras` file."""
    source = Path(source)
    if source.is_dir() and (source / "report.json").is_file():
        return load_run_model(source)[1]
    if source.suffix == ".keras" and source.is_file():  # importing this package registered its classes
        return keras.models.load_model(source)
    raise FileNotFoundError(f"{str(source)!r} is neither a run folder (with report.json) nor a .keras file.")
