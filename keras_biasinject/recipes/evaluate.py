"""After a run: evaluate its trained adapter at chosen controls on the run's test split."""

from keras_biasinject.recipes.datasets import compile_for_recipe, control_vector, score, split_dataset, with_control
from keras_biasinject.recipes.run_folder import load_run_model
from keras_biasinject.rewrite.kerashub import preprocessor_detached


def evaluate_run(run, controls=(1.0, None)):
    """[{control, metric, value}] on the run's test split, one row per control.

    Each control is what the model receives: a number (in every control dimension) or a vector;
    None is the injection's neutral control (the learned behaviour off)."""
    recipe, model = load_run_model(run)
    test = split_dataset(recipe, "test", model.preprocessor, with_control_input=True)
    compile_for_recipe(model)
    rows = []
    with preprocessor_detached(model):  # the test split is tokenized already
        for control in controls:
            vector = control_vector(recipe, control)
            metric, value = score(model, recipe, with_control(test, vector))
            rows.append({"control": vector.tolist(), "metric": metric, "value": value})
    return rows
