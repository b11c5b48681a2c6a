"""The recipe runner on a real model (MiniLM, 16 reviews of 16 tokens): what it refuses and what a
diverged run leaves behind (nothing of that method)."""

import json

import pytest

from keras_biasinject.recipes import Recipe, finetune
from keras_biasinject.recipes.run_folder import base_model, run_recipe


def small_recipe(**train):
    return Recipe(task="classification", model={"spec": "minilm-l6", "sequence_length": 16},
                  data={"source": "small_fine_foods", "text_column": "review", "label_column": "label",
                        "control_map": {"great": 1.0, "other": 1.0}},
                  inject={"rank": 2, "trainable": ["logits"]},
                  train={"methods": ["bias_injection"], "epochs": 2, "batch_size": 8, "max_train_examples": 16,
                         "max_eval_examples": 8, **train})


def test_a_diverging_run_stops_with_an_error_and_keeps_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"bias_injection: training diverged: (the loss became (nan|inf) at epoch 1, batch \d|the "
                                         r"loss stayed finite but trainable weights did not)(; \d+ trainable weight\(s\) are "
                                         r"NaN or inf \(.*\))?\. Likely causes: the "
                                         r"learning rate \(1e\+30\) is too high"):
        finetune(small_recipe(learning_rate=1e30, epochs=1, max_train_examples=24), run, verbose=0)  # 3 steps
    assert not (run / "adapter").exists() and not (run / "classifier.keras").exists()
    assert not (run / "backup" / "bias_injection").exists()  # the next run starts afresh, not from NaN weights
    assert not (run / "report.json").exists() or json.loads((run / "report.json").read_text())["results"] == []


def test_a_sequence_length_beyond_the_position_embeddings_is_refused_at_load():
    with pytest.raises(ValueError, match=r"\[model\] sequence_length=5000 is more than 'minilm-l6' has position "
                                         r"embeddings for \(max_sequence_length=512\). Set sequence_length <= 512"):
        base_model(Recipe(task="classification", model={"spec": "minilm-l6", "sequence_length": 5000, "num_classes": 2}))


@pytest.mark.parametrize("text, message", [
    ('{"recipe": {"task": "classification", "mod', r"is not a valid report \(Unterminated string"),
    ("[1, 2]", r'is not a valid report \(no "recipe" table'),
    ('{"recipe": {"tsk": 1}, "results": []}', r"holds a recipe this version cannot read"),
])
def test_a_corrupt_report_names_the_file_and_the_fix(tmp_path, text, message):
    (tmp_path / "report.json").write_text(text)
    fix = "Restore it, or run `kbi finetune` again into a new folder" if "valid report" in message else "Restore the file"
    with pytest.raises(ValueError, match=rf"'.*report.json' {message}.*{fix}"):
        run_recipe(tmp_path)
    if "valid report" in message:  # resuming into the folder reads it too
        with pytest.raises(ValueError, match=rf"'.*report.json' {message}"):
            finetune(small_recipe(), tmp_path, verbose=0)


def test_class_weights_reach_fit_and_weigh_each_examples_loss(tmp_path):
    """With a learning rate too small to move anything (1e-12), fit's reported loss is the class-weighted
    mean of the per-example losses of the model it returns: sum_i w[y_i] l_i / n (Keras' "sum over batch size")."""
    import numpy as np

    from keras_biasinject.recipes.datasets import split_dataset
    from keras_biasinject.recipes.finetune import run_method
    from keras_biasinject.rewrite.kerashub import preprocessor_detached

    recipe = small_recipe(methods=["keras_lora"], epochs=1, learning_rate=1e-12, class_weight={"great": 0.5, "other": 3.0})
    recipe.model.dropout = 0.0  # a deterministic forward pass in training too
    rows, history, model = run_method(recipe, "keras_lora", tmp_path, verbose=0)  # LoRA's B starts at zero
    assert rows[0]["pooling"] == "mean" and 0.0 <= rows[0]["macro_f1"] <= 1.0
    losses, labels = [], []
    train = split_dataset(recipe, "train", model.preprocessor, False)
    with preprocessor_detached(model):
        for x, y in train:
            logits = np.asarray(model(x, training=False), "float64")
            log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            losses.append(-log_softmax[np.arange(len(y)), np.asarray(y)])
            labels.append(np.asarray(y))
    losses, labels = np.concatenate(losses), np.concatenate(labels)
    assert len(losses) == 16 and 0 < labels.sum() < 16  # both classes among the 16 training reviews
    weighted = (np.where(labels == 0, 0.5, 3.0) * losses).mean()
    assert history["loss"][0] == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - losses.mean()) > 1e-2  # the unweighted loss differs


def test_the_frozen_base_head_is_a_linear_probe_fitted_to_its_optimum(tmp_path):
    """The base group's head is the L2-penalized, class-weighted logistic regression on the frozen model's
    features with the strength of lowest validation loss: the model's logits equal features @ W + b, and
    the penalized objective's gradient at that W, b is zero (to the solver's tolerance)."""
    import numpy as np

    from keras_biasinject.recipes.datasets import split_dataset
    from keras_biasinject.recipes.finetune import run_method
    from keras_biasinject.recipes.linear_probe import L2_GRID, _objective_and_gradient, head_features
    from keras_biasinject.rewrite.kerashub import preprocessor_detached

    recipe = small_recipe(methods=["base"], class_weight={"great": 0.5, "other": 3.0})
    rows, history, model = run_method(recipe, "base", tmp_path, verbose=0)
    probe = rows[0]["probe"]
    assert history == {} and rows[0]["trainable_params"] == 384 * 2 + 2 and rows[0]["pooling"] == "mean"
    assert probe["l2"] == L2_GRID[int(np.argmin(probe["val_loss"]))] and len(probe["val_loss"]) == len(L2_GRID)
    train = split_dataset(recipe, "train", model.preprocessor, False)
    with preprocessor_detached(model):
        features, labels = head_features(model, train, "training")
        logits = np.concatenate([np.asarray(model(x, training=False), "float64") for x, _ in train])
    head = model.get_layer("logits")
    kernel, bias = np.asarray(head.kernel, "float64"), np.asarray(head.bias, "float64")
    np.testing.assert_allclose(logits, features @ kernel + bias, atol=1e-5)  # float32 model against float64 product
    # The optimum in the standardized coordinates the solver works in: the gradient vanishes there.
    mean, scale = features.mean(0), np.where(features.std(0) > 0, features.std(0), 1.0)
    params = np.concatenate([kernel * scale[:, None], (bias + mean @ kernel)[None]])  # (D + 1, K)
    x = np.concatenate([(features - mean) / scale, np.ones((len(features), 1))], axis=1)
    weights = np.where(labels == 0, 0.5, 3.0)
    _, gradient = _objective_and_gradient(params, x, np.eye(2)[labels], weights, probe["l2"])
    assert np.abs(gradient).max() < 1e-4  # float32 storage of W, b rounds the 1e-6 solver tolerance up
    assert probe["steps"][L2_GRID.index(probe["l2"])] < 4000  # converged, not stopped by the step cap


def test_an_int8_base_trains_adapters_and_stays_int8(tmp_path):
    """`[model] quantize = "int8"`: the backbone's projections are Keras int8 layers, the adapters and the
    head train in float32 on top, the base's integer weights never change, and the model saved as
    `.keras` loads back int8 with the same answers (exactly)."""
    import keras
    import numpy as np

    from keras_biasinject.recipes.config import load_recipe
    from keras_biasinject.recipes.finetune import run_method

    recipe = small_recipe(methods=["keras_lora", "bias_injection"])
    recipe.model.quantize = "int8"
    rows, history, model = run_method(recipe, "bias_injection", tmp_path, verbose=0)
    query = model.backbone.transformer_layers[0]._self_attention_layer._query_dense
    assert query.base_layer.quantization_mode == "int8" and query.lora_a.dtype == "float32"
    assert rows[0]["base_weights_unchanged"] is True and len(history["loss"]) == 2
    assert all(v.dtype == "float32" for v in model.trainable_weights)
    model.save(tmp_path / "int8.keras")
    loaded = keras.models.load_model(tmp_path / "int8.keras")
    assert loaded.backbone.transformer_layers[0]._self_attention_layer._query_dense.base_layer.quantization_mode == "int8"
    x = {"token_ids": np.array([[101, 2023, 2003, 2307, 102, 0]], "int32"), "padding_mask": np.array([[1, 1, 1, 1, 1, 0]], bool),
         "segment_ids": np.zeros((1, 6), "int32"), "control": np.array([[1.0]], "float32")}
    model.preprocessor = loaded.preprocessor = None
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    rows, _, lora = run_method(recipe, "keras_lora", tmp_path, verbose=0)
    assert lora.backbone.transformer_layers[0]._self_attention_layer._query_dense.quantization_mode == "int8"
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "classification"\n[model]\nquantize = "int4"\n[data]\nsource = "small_fine_foods"\n')
    with pytest.raises(ValueError, match=r"\[model\] quantize must be one of \['int8'\] or left out. Got quantize='int4'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match=r"method 'full' trains every base weight, but \[model\] quantize='int8'"):
        Recipe(task="classification", model={"spec": "minilm-l6", "quantize": "int8"}, data={"source": "small_fine_foods"},
               train={"methods": ["full"]})
