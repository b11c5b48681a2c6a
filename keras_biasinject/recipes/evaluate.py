"""After a run: evaluate its trained adapter at chosen controls on the run's test split."""

from keras_biasinject.recipes.datasets import (control_vector, compile_for_recipe, data_config, labels_and_predictions, score,
                                               split_dataset, with_control)
from keras_biasinject.recipes.report import classification_metrics
from keras_biasinject.recipes.run_folder import load_run_model
from keras_biasinject.rewrite.kerashub import preprocessor_detached


def evaluate_run(run, controls=(1.0, None)):
    """[{control, metric, value, ...}] on the run's test split, one row per control.

    Each control is what the model receives: a number (in every control dimension) or a vector;
    None is the injection's neutral control (the learned behaviour off). Classification rows add the
    majority baseline, macro-F1, per-class recall and predictions per class (`classification_metrics`)."""
    recipe, model = load_run_model(run)
    test = split_dataset(recipe, "test", model.preprocessor, with_control_input=True)
    compile_for_recipe(model)
    names = data_config(recipe).class_names if recipe.task == "classification" else None
    rows = []
    with preprocessor_detached(model):  # the test split is tokenized already
        for control in controls:
            vector = control_vector(recipe, control)
            ds = with_control(test, vector)
            metric, value = score(model, recipe, ds)
            row = {"control": vector.tolist(), "metric": metric, "value": value}
            if recipe.task == "classification":
                metrics = classification_metrics(*labels_and_predictions(model, ds), names)
                row.update({k: v for k, v in metrics.items() if k != "accuracy"})
            rows.append(row)
    return rows
