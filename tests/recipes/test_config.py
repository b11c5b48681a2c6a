import json

import numpy as np
import pytest

from keras_biasinject.recipes import Recipe, load_recipe
from keras_biasinject.recipes.config import set_key

GOOD = """
task = "classification"
[model]
spec = "minilm-l6"
[data]
source = "small_fine_foods"
text_column = "review"
label_column = "label"
control_map = { great = 1.0, other = 1.0 }
[train]
epochs = 1
"""
LM = GOOD.replace('task = "classification"', 'task = "causal_lm"').replace('"minilm-l6"', '"smollm2-135m"')


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_recipes_load():
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[2] / "recipes"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["classify_fine_foods.toml", "loop_reviews_lm.toml", "my_data.yaml", "steer_reviews_lm.toml",
                     "steer_reviews_strong.toml"]
    classify = load_recipe(folder / "classify_fine_foods.toml")
    assert classify.task == "classification" and classify.train.methods == ["base", "keras_lora", "bias_injection"]
    steer = load_recipe(folder / "steer_reviews_lm.toml")
    assert steer.task == "causal_lm" and steer.data["control_map"] == {"great": 1.0, "other": -1.0}
    assert steer.steer.judge == "runs/classify"
    strong = load_recipe(folder / "steer_reviews_strong.toml")
    assert strong.inject.targets == "all-linear" and strong.train.max_train_examples == 1024 and strong.steer.judge is None
    loop = load_recipe(folder / "loop_reviews_lm.toml")
    assert loop.train.methods == ["bias_injection", "feedback_head"] and loop.feedback.control_jitter == 1.5
    assert {k: v for k, v in loop.to_dict().items() if k not in ("name", "train", "feedback")} == {
        k: v for k, v in strong.to_dict().items() if k not in ("name", "train", "feedback")}  # recipe 3 plus the head
    mine = load_recipe(folder / "my_data.yaml")
    assert mine.name == "my_data" and mine.train.epochs == 3


def test_overrides_and_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), [("train.epochs", 3), ("inject.rank", 4), ("model.sequence_length", 64)])
    assert (recipe.train.epochs, recipe.inject.rank, recipe.model.sequence_length) == (3, 4, 64)
    assert Recipe(**recipe.to_dict()).to_dict() == recipe.to_dict()
    data = {}
    set_key(data, "a.b.c", 1)
    assert data == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("epochs = 1", "epoch = 1"), r"unknown key\(s\) \['epoch'\] in \[train\]. Allowed keys: \[.*'epochs'"),
        (GOOD.replace('task = "classification"', 'task = "regression"'), r"task must be one of \['classification', 'causal_lm'\]. Got task='regression'"),
        (GOOD + 'methods = ["base", "lora"]\n', r"methods must be distinct names from \['base', 'keras_lora', 'full', 'bias_injection', 'feedback_head'\]. Got methods=\['base', 'lora'\]"),
        (GOOD.replace("epochs = 1", "epochs = 0"), r"\[train\]: `epochs` must be a positive integer. Got epochs=0"),
        (GOOD.replace("epochs = 1", "learning_rate = -1"), r"\[train\]: `learning_rate` must be a positive number. Got learning_rate=-1"),
        (GOOD.replace("epochs = 1", 'save_freq = "step"'), r'\[train\]: `save_freq` must be "epoch" or a positive number of steps. Got save_freq=.step.'),
        (GOOD.replace("epochs = 1", "save_freq = 0"), r"`save_freq` must be .* Got save_freq=0"),
        (GOOD.replace('spec = "minilm-l6"', 'spec = "minilm-l6"\ndropout = 1.5'), r"\[model\] dropout must be a number in \[0, 1\), or left out. Got dropout=1.5"),
        (GOOD + '[inject]\nrank = "8"\n', r"\[inject\] InjectionConfig: `rank` must be a positive integer. Got rank='8'"),
        (GOOD + "[steer]\njudge = 'x'\n", r"\[steer\] is for task='causal_lm'"),
        ("stray = 1\n" + GOOD, r"unknown key\(s\) \['stray'\] at the top of"),
        (GOOD + 'methods = ["bias_injection", "feedback_head"]\n[feedback]\n', r"'feedback_head' needs task='causal_lm'"),
        (LM + 'methods = ["bias_injection", "feedback_head"]\n', r"'feedback_head' needs .* a \[feedback\] table"),
        (LM + 'methods = ["feedback_head", "bias_injection"]\n[feedback]\n', r"list that method before it"),
        (LM + 'methods = ["bias_injection", "feedback_head"]\n[feedback]\npooling = "max"\n', r"\[feedback\] pooling must be .* Got pooling='max'"),
        (LM + 'methods = ["bias_injection", "feedback_head"]\n[feedback]\ncontrol_jitter = -1\n', r"control_jitter must be a finite number >= 0. Got control_jitter=-1"),
        (LM + '[feedback]\nheads = 2\n', r"unknown key\(s\) \['heads'\] in \[feedback\]"),
        (GOOD + 'methods = ["keras_lora", "bias_injection"]\n[inject]\nblocks = [-1]\n',
         r"method 'keras_lora' \(KerasHub's enable_lora\) adapts every layer of a chosen name in every block, so it cannot "
         r"follow \[inject\] blocks=\[-1\] or exclude=None"),
        ("task = [", r"is not valid TOML"),
    ],
)
def test_bad_recipes_name_the_key_and_the_allowed_values(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, text))


def test_file_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"must end in .toml, .yaml or .yml"):
        load_recipe(write(tmp_path, GOOD, "r.txt"))
    yaml_recipe = load_recipe(write(tmp_path, "task: causal_lm\nmodel: {spec: smollm2-135m}\n", "r.yaml"))
    assert yaml_recipe.task == "causal_lm" and yaml_recipe.model.spec == "smollm2-135m"


def test_a_finished_run_from_before_new_recipe_keys_is_still_the_same_recipe(tmp_path):
    import json

    from keras_biasinject.recipes import finetune

    recipe = load_recipe(write(tmp_path, GOOD.replace("epochs = 1", 'methods = ["base"]')))
    old = recipe.to_dict()
    del old["train"]["save_freq"], old["model"]["dropout"]  # keys added after this run was written
    del old["train"]["class_weight"], old["model"]["pooling"]
    row = {"method": "base", "metric": "accuracy", "value": 0.5, "trainable_params": 770, "seconds": 1.0, "pooling": "mean"}
    report = {"recipe": json.loads(json.dumps(old)), "results": [row], "history": {"base": {"loss": [0.7]}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    assert finetune(recipe, tmp_path / "run")["results"] == [row]  # kept, not retrained, not refused
    del row["pooling"]  # written before the pooling could be chosen: MiniLM's head read [CLS] then, mean now
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"holds results of classifiers with \['cls'\] pooling, and this run's \[model\] "
                                         r"pooling='auto' gives 'mean' .* Choose another output folder, or set \[model\] pooling"):
        finetune(recipe, tmp_path / "old")
    changed = load_recipe(write(tmp_path, GOOD.replace("epochs = 1", 'methods = ["base"]\nsave_freq = 5'), "b.toml"))
    with pytest.raises(ValueError, match="holds the report of a different recipe"):
        finetune(changed, tmp_path / "run")


@pytest.mark.parametrize(
    "text, key",
    [
        (GOOD.replace("epochs = 1", "learning_rate = inf"), r"train.learning_rate` = inf"),
        (GOOD.replace("epochs = 1", "full_learning_rate = nan"), r"train.full_learning_rate` = nan"),
        (GOOD.replace("great = 1.0", "great = -inf"), r"data.control_map.great` = -inf"),
        (GOOD + "[inject]\nalpha = inf\n", r"inject.alpha` = inf"),
        (GOOD + "[inject]\nneutral = [0.0, nan]\ncontrol_dim = 2\n", r"inject.neutral\[1\]` = nan"),
        (LM + "[steer]\ncontrols = [-1.0, inf]\n", r"steer.controls\[1\]` = inf"),
        (LM + 'methods = ["bias_injection", "feedback_head"]\n[feedback]\ncontrol_jitter = inf\n', r"feedback.control_jitter` = inf"),
        (GOOD.replace('spec = "minilm-l6"', 'spec = "minilm-l6"\ndropout = nan'), r"model.dropout` = nan"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere(tmp_path, text, key):
    with pytest.raises(ValueError, match=rf"recipe: `{key} is not a finite number. NaN and inf are refused everywhere"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.learning_rate", float("inf"), r"train.learning_rate` = inf is not a finite number"),  # --set ...=1e999
        ("train.epochs", True, r"\[train\]: `epochs` must be a positive integer. Got epochs=True"),
        ("train.epochs", 1.5, r"\[train\]: `epochs` must be a positive integer. Got epochs=1.5"),
        ("train.epochs", "1", r"\[train\]: `epochs` must be a positive integer. Got epochs='1'"),
        ("train.batch_size", False, r"`batch_size` must be a positive integer. Got batch_size=False"),
        ("inject.rank", True, r"\[inject\] InjectionConfig: `rank` must be a positive integer. Got rank=True"),
        ("inject.targets", None, r"\[inject\] InjectionConfig: `targets` must name the layers to adapt"),
        ("inject.targets", "query(", r"\[inject\] InjectionConfig: `targets`='query\(' is not a valid regex"),
        ("inject.blocks", 0, r"\[inject\] InjectionConfig: `blocks` must be a list of block indices \(e.g."),
        ("steer.samples", True, r"\[steer\]: `samples` must be a positive integer. Got samples=True"),
        ("steer.controls", "1", r"\[steer\]: `controls` must be a non-empty list of finite numbers"),
        ("steer.positive_label", -1, r"\[steer\]: `positive_label` must be an integer >= 0"),
    ],
)
def test_overrides_of_the_wrong_type_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, GOOD), [(key, value)])


DIGITS_400 = "9" * 400  # beyond the float range: `float()` and `math.isfinite` raise OverflowError on it


@pytest.mark.parametrize(
    "text, key",
    [
        (GOOD + f"[inject]\nalpha = {DIGITS_400}\n", "inject.alpha"),
        (GOOD + f"[inject]\nneutral = [{DIGITS_400}]\n", r"inject.neutral\[0\]"),
        (GOOD.replace("epochs = 1", f"learning_rate = {DIGITS_400}"), "train.learning_rate"),
        (GOOD.replace("great = 1.0", f"great = {DIGITS_400}"), "data.control_map.great"),
        (LM + f"[steer]\ncontrols = [-1, {DIGITS_400}]\n", r"steer.controls\[1\]"),
        (LM + f'methods = ["bias_injection", "feedback_head"]\n[feedback]\ncontrol_jitter = {DIGITS_400}\n', "feedback.control_jitter"),
    ],
)
def test_integers_beyond_the_float_range_are_refused_anywhere(tmp_path, text, key):
    with pytest.raises(ValueError, match=rf"recipe: `{key}` = an integer of 400 digits is out of range: .* Give a smaller value"):
        load_recipe(write(tmp_path, text))


def test_a_toml_integer_too_long_to_read_names_the_file(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs = 1", "epochs = 1" + "0" * 5000))
    with pytest.raises(ValueError, match=rf"recipe: '{path}' is not valid TOML: .*4300 digits"):
        load_recipe(path)


def test_numpy_integers_are_accepted_where_ints_are(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), [("train.epochs", np.int64(2)), ("inject.rank", np.int64(2)),
                                                 ("inject.blocks", [np.int64(0)]), ("steer.samples", np.int32(3)),
                                                 ("train.methods", ["base", "bias_injection"])])  # keras_lora: no blocks
    assert recipe.train.epochs == 2 and recipe.inject.rank == 2 and recipe.inject.blocks == [0]
    assert json.loads(json.dumps(recipe.to_dict()))["steer"]["samples"] == 3  # report.json holds it


# ---- [model] pooling and [train] class_weight -------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + 'class_weight = "inverse"\n',
         r"recipe: `train.class_weight` = 'inverse' is not a known weighting. Use \"balanced\""),
        (GOOD + "class_weight = { great = 1.0, meh = 2.0 }\n",
         r"`train.class_weight` = \{'great': 1.0, 'meh': 2.0\} names unknown label\(s\) \['meh'\]. The labels .* are "
         r"\['great', 'other'\]: use those"),
        (GOOD + "class_weight = { great = 1.0, other = -2.0 }\n",
         r"`train.class_weight` = .*: the weight\(s\) \{'other': -2.0\} are not finite numbers >= 0"),
        (GOOD + "class_weight = { great = 1.0, other = true }\n", r"the weight\(s\) \{'other': True\} are not finite"),
        (GOOD + "class_weight = { great = 0.0, other = 0 }\n", r"`train.class_weight` = .*: every weight is 0"),
        (GOOD + "class_weight = { great = nan }\n", r"recipe: `train.class_weight.great` = nan is not a finite number"),
        (GOOD + "class_weight = 2\n", r"`train.class_weight` = 2 must be \"balanced\" or a non-empty mapping"),
        (LM + 'class_weight = "balanced"\n',
         r"recipe: `train.class_weight` = 'balanced' weights the classes of a classifier; task='causal_lm' has none. "
         r"Remove train.class_weight"),
        (GOOD.replace('spec = "minilm-l6"', 'spec = "minilm-l6"\npooling = "max"'),
         r"\[model\] pooling must be one of \['auto', 'cls', 'mean'\]. Got pooling='max'"),
        (LM.replace('spec = "smollm2-135m"', 'spec = "smollm2-135m"\npooling = "mean"'),
         r"\[model\] pooling='mean' is for task='classification'"),
    ],
)
def test_bad_class_weights_and_poolings_are_refused_at_load(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, text))


def test_class_weights_by_hand(tmp_path):
    from keras_biasinject.recipes.config import class_weights

    labels = [0, 0, 0, 1]  # 3 great, 1 other
    balanced = load_recipe(write(tmp_path, GOOD), [("train.class_weight", "balanced")])
    assert class_weights(balanced, labels) == pytest.approx({0: 4 / (2 * 3), 1: 4 / (2 * 1)}, abs=1e-12)
    mapped = load_recipe(write(tmp_path, GOOD), [("train.class_weight", {"other": 3})])
    assert mapped.train.class_weight == {"other": 3.0}
    assert class_weights(mapped, labels) == {0: 1.0, 1: 3.0}  # labels left out weigh 1
    assert class_weights(load_recipe(write(tmp_path, GOOD)), labels) is None
    with pytest.raises(ValueError, match=r"`train.class_weight` = 'balanced' needs training examples of every class; "
                                         r"class\(es\) \['other'\] have none"):
        class_weights(balanced, [0, 0])
    yaml_keys = load_recipe(write(tmp_path, "task: classification\ndata: {label_column: y, text_column: t, source: a.csv, "
                                            "label_names: [1, 2], control_columns: [c]}\ntrain: {class_weight: {2: 0.5}}\n",
                                  "r.yaml"))
    assert class_weights(yaml_keys, [0, 1]) == {0: 1.0, 1: 0.5}  # YAML integer labels match the data's labels
    assert load_recipe(write(tmp_path, GOOD)).model.pooling == "auto"
