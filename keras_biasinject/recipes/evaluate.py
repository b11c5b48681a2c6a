"""After a run: evaluate its adapter at chosen controls, and generate text with a control."""

import json
from pathlib import Path

import keras
import numpy as np

from keras_biasinject.models.load import load


def _run_recipe(run):
    from keras_biasinject.recipes.config import Recipe

    path = Path(run) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"evaluate: {str(run)!r} has no report.json; give a folder written by `kbi finetune`.")
    data = json.loads(path.read_text())["recipe"]
    return Recipe(**data)


def load_run_model(run):
    """The run's base model with its trained adapter, as `kbi finetune` saved it."""
    from keras_biasinject.recipes.finetune import LOAD_TASK, _data_config, _splits
    from keras_biasinject.rewrite.adapter_file import load_adapter

    recipe = _run_recipe(run)
    adapter = Path(run) / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"evaluate: {str(run)!r} has no adapter/; the run did not finish method 'bias_injection'.")
    extra = {}
    if recipe.task == "classification":
        extra["num_classes"] = recipe.model.num_classes or len(_data_config(recipe, _splits(recipe)[0]).class_names)
    model = load(recipe.model.spec, task=LOAD_TASK[recipe.task], sequence_length=recipe.model.sequence_length, **extra)
    return recipe, load_adapter(model, adapter)


def evaluate_run(run, controls=(1.0, 0.0)):
    """[{control, metric, value}] on the run's test split, one row per control value."""
    from keras_biasinject.recipes.finetune import _dataset, _score, _splits, _with_control

    recipe, model = load_run_model(run)
    data, splits = _splits(recipe)
    test = _dataset(recipe, data, splits["test"], model.preprocessor, True, shuffle=False)
    model.preprocessor = None
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    rows = []
    for control in controls:
        metric, value = _score(model, recipe, _with_control(test, float(control)))
        rows.append({"control": float(control), "metric": metric, "value": value})
    return rows


def parse_control(text):
    """"1" -> [1.0]; "1,-0.5" -> [1.0, -0.5]; anything else is a stored control name."""
    if text is None:
        return None
    try:
        return np.asarray([float(v) for v in str(text).split(",")], "float32")
    except ValueError:
        return str(text)


def generate(spec, prompts, adapter=None, control=None, max_length=64):
    """Greedy generations for `prompts` from a causal LM, with an adapter and a control if given."""
    from keras_biasinject.rewrite.adapter_file import load_adapter

    lm = load(spec, task="causal_lm")
    lm.compile(sampler="greedy")
    control = parse_control(control)
    if adapter is not None:
        lm = load_adapter(lm, adapter)
    elif control is not None:
        raise ValueError("generate: --control needs --adapter (a plain model has no control input).")
    kwargs = {} if control is None else {"control": control}
    outputs = lm.generate(list(prompts), max_length=max_length, **kwargs)
    return [outputs] if isinstance(outputs, str) else list(outputs)
