"""Classification metrics beside accuracy, worked out by hand on small prediction sets, and the warning
for a method that learned nothing beyond the majority class."""

import pytest

from keras_biasinject.recipes.report import classification_metrics, results_table

NAMES = ["great", "ok", "bad"]


def test_metrics_of_a_three_class_prediction_set_by_hand():
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]  # 6 great, 2 ok, 2 bad
    predictions = [0, 0, 0, 0, 1, 2, 1, 0, 2, 2]
    m = classification_metrics(labels, predictions, NAMES)
    assert m["accuracy"] == 0.7  # 4 + 1 + 2 of 10
    assert m["majority_baseline"] == 0.6 and m["majority_class"] == "great"
    # great: P = 4/5, R = 4/6 -> F1 = 2*4/(6+5) = 8/11; ok: P = 1/2, R = 1/2 -> 1/2; bad: P = 2/3, R = 1 -> 4/5
    assert m["macro_f1"] == pytest.approx((8 / 11 + 1 / 2 + 4 / 5) / 3, abs=1e-12)
    assert m["per_class_recall"] == pytest.approx({"great": 4 / 6, "ok": 1 / 2, "bad": 1.0}, abs=1e-12)
    assert m["predicted"] == {"great": 5, "ok": 2, "bad": 3}
    assert m["learned_nothing"] is False and "warning" not in m


def test_an_all_majority_predictor_gets_the_warning():
    labels = [0] * 6 + [1] * 2 + [2] * 2
    m = classification_metrics(labels, [0] * 10, NAMES)
    assert (m["accuracy"], m["majority_baseline"]) == (0.6, 0.6)
    assert m["macro_f1"] == pytest.approx((2 * 6 / 16) / 3, abs=1e-12)  # great: F1 = 2*6/(6+10); ok, bad: 0
    assert m["per_class_recall"] == {"great": 1.0, "ok": 0.0, "bad": 0.0}
    assert m["learned_nothing"] is True
    assert m["warning"].startswith("accuracy 0.6000 is within one example of the majority baseline 0.6000 ('great' every "
                                   "time) and 10 of 10 predictions are 'great': it learned nothing beyond answering")
    assert 'train.class_weight = "balanced"' in m["warning"]
    table = results_table({"results": [{"method": "base", "metric": "accuracy", "value": 0.6, "trainable_params": 770,
                                        "seconds": 1.0, **{k: v for k, v in m.items() if k != "accuracy"}}]})
    assert "| base | accuracy | 0.6000 | 0.6000 | 0.2500 | great 1.00, ok 0.00, bad 0.00 | 770 | 1.0 |" in table
    assert table.splitlines()[-1] == f"WARNING: base: {m['warning']}"


@pytest.mark.parametrize("predictions, fires", [
    ([0] * 200, True),  # always the majority: accuracy 0.75
    ([0] * 199 + [1], True),  # one stray (right) prediction: 0.755, within one example (1/200) of 0.75
    ([0] * 147 + [1] * 6 + [0] * 47, False),  # 0.75 exactly, but 6 predictions elsewhere: more than 1% of 200
    ([0] * 198 + [1] * 2, False),  # 198 of 200 alike (nearly all), but 0.76: two examples above the majority share
    ([1] * 200, False),  # all one class, the minority one: 0.25
])
def test_the_warning_needs_both_the_majority_accuracy_and_one_predicted_class(predictions, fires):
    labels = [0] * 150 + [1] * 50  # majority share 0.75
    m = classification_metrics(labels, predictions, ["a", "b"])
    assert m["learned_nothing"] is fires


def test_a_learning_predictor_at_the_majority_share_is_not_warned():
    labels = [0] * 6 + [1] * 4  # majority share 0.6
    predictions = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # accuracy 0.6 too, but both classes predicted
    m = classification_metrics(labels, predictions, ["a", "b"])
    assert m["accuracy"] == m["majority_baseline"] == 0.6 and m["learned_nothing"] is False


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="classification_metrics: labels and predictions must be two non-empty lists of "
                                         "the same length. Got 3 labels and 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1])
