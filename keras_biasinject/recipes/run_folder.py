"""The model behind a finished run folder (or a `.keras` file): one loader for `kbi evaluate`,
`kbi export`, `kbi serve --source` and the benchmarks.

A run folder is what `finetune` writes: `report.json` (which holds the recipe), `adapter/` (the
trained bias injection, written by `save_adapter`) and, for classification, `classifier.keras`.
"""

from pathlib import Path

import keras

from keras_biasinject.models.load import load
from keras_biasinject.recipes.config import Recipe
from keras_biasinject.recipes.datasets import num_classes
from keras_biasinject.recipes.report import read_report
from keras_biasinject.rewrite.adapter_file import load_adapter

LOAD_TASK = {"classification": "classifier", "causal_lm": "causal_lm"}  # recipe task -> `load(task=)`


def base_model(recipe, dropout=None):
    """A freshly loaded base model for `recipe` (the task `load` makes, at its sequence length; its
    backbone quantized when `[model] quantize` says so, a causal LM's token embedding excepted)."""
    extra = {} if dropout is None else {"dropout": float(dropout)}
    if recipe.task == "classification":
        extra["num_classes"] = num_classes(recipe)
        extra["pooling"] = None if recipe.model.pooling == "auto" else recipe.model.pooling
    model = load(recipe.model.spec, task=LOAD_TASK[recipe.task], sequence_length=recipe.model.sequence_length, **extra)
    if recipe.model.quantize is not None:  # the backbone only: a classifier's head stays float and trains
        # A causal LM's token embedding is also its output head, and Keras' quantized reverse projection has no
        # usable gradient (see `refuse_quantized_lm_head`): it stays float32.
        lm = recipe.task == "causal_lm"
        model.backbone.quantize(recipe.model.quantize,
                                filters=lambda layer: not (lm and isinstance(layer, keras.layers.ReversibleEmbedding)))
    maximum = getattr(model.backbone, "max_sequence_length", None)  # learned position embeddings (BERT, GPT-2)
    if isinstance(maximum, int) and recipe.model.sequence_length > maximum:
        raise ValueError(f"recipe: [model] sequence_length={recipe.model.sequence_length} is more than {recipe.model.spec!r} "
                         f"has position embeddings for (max_sequence_length={maximum}). Set sequence_length <= {maximum}.")
    return model


def run_recipe(run):
    """The `Recipe` a run folder was made with (from its `report.json`)."""
    path = Path(run) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} has no report.json; give a folder written by `kbi finetune`.")
    saved = read_report(path)["recipe"]
    try:
        return Recipe(**saved)
    except TypeError as error:  # unknown or missing keys in the saved recipe
        raise ValueError(f"{str(path)!r} holds a recipe this version cannot read ({error}). Restore the file, "
                         "or run `kbi finetune` again into a new folder.") from None
    except ValueError as error:
        raise ValueError(f"{str(path)!r}: {error}") from None


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
