"""Classifier pooling: which one `load` picks from a checkpoint's files, the masked mean against numpy,
and the mean-pooled classifier under `inject` (exact at insertion, neutral control = base, `.keras`).
`fit` on it, with the frozen base checked bit for bit, runs in tests/recipes/test_finetune.py."""

import json
import os

import keras
import numpy as np
import pytest

from keras_biasinject import inject
from keras_biasinject.models import load
from keras_biasinject.models.load import pooling_of, resolve_preset, with_pooling
from keras_biasinject.models.pooling import MaskedMeanPooling, MeanPooledTextClassifier, checkpoint_pooling
from keras_biasinject.rewrite.frozen import FrozenSnapshot

SENTENCES = ["A fine tea.", "Stale, bitter and far too expensive for what it is.", "ok", "Great!"]


@pytest.fixture(scope="module")
def mean_classifier():
    """all-MiniLM-L6-v2 as `load` gives it: mean pooling, read from its 1_Pooling folder."""
    return load("minilm-l6", task="classifier", num_classes=3, sequence_length=16)


@pytest.fixture(scope="module")
def tokens(mean_classifier):
    x = mean_classifier.preprocessor(SENTENCES)
    return {k: np.asarray(v) for k, v in (x[0] if isinstance(x, tuple) else x).items()}


def _without_pooling_files(tmp_path):
    """The MiniLM folder (its files linked, not copied) without 1_Pooling and modules.json."""
    source = resolve_preset("minilm-l6")
    folder = tmp_path / "plain-bert"
    folder.mkdir()
    for name in os.listdir(source):
        if name not in ("1_Pooling", "modules.json"):
            os.symlink(os.path.join(source, name), folder / name)
    return folder


def test_the_pooling_comes_from_the_checkpoint_files(tmp_path):
    minilm = resolve_preset("minilm-l6")
    with open(os.path.join(minilm, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_mean_tokens"] is True
    assert checkpoint_pooling(minilm) == "mean"
    assert checkpoint_pooling(_without_pooling_files(tmp_path)) is None
    assert checkpoint_pooling("bert_tiny_en_uncased") is None  # a preset name: no files to read
    cls = tmp_path / "cls-model"
    (cls / "pooling").mkdir(parents=True)  # modules.json names the folder; the default one is absent
    (cls / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                                                  {"path": "pooling", "type": "sentence_transformers.models.Pooling"}]))
    (cls / "pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert checkpoint_pooling(cls) == "cls"
    (cls / "pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert checkpoint_pooling(cls) is None  # a mode we do not offer: KerasHub's own


@pytest.mark.slow
def test_load_picks_mean_for_minilm_and_cls_without_the_files(tmp_path, mean_classifier):
    assert type(mean_classifier) is MeanPooledTextClassifier and pooling_of(mean_classifier) == "mean"
    plain = load(_without_pooling_files(tmp_path), task="classifier", num_classes=2, sequence_length=16)
    assert type(plain).__name__ == "BertTextClassifier" and pooling_of(plain) == "cls"
    chosen = load("minilm-l6", task="classifier", num_classes=2, sequence_length=16, pooling="cls")
    assert type(chosen).__name__ == "BertTextClassifier"
    switched = with_pooling(chosen, "mean")
    assert type(switched) is MeanPooledTextClassifier and switched.backbone is chosen.backbone
    assert switched.preprocessor is chosen.preprocessor and switched.num_classes == 2
    assert with_pooling(switched, "mean") is switched


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="classifier", num_classes=2, pooling="max"), r"pooling='max' is not one of \('cls', 'mean'\)"),
    (dict(task="causal_lm", pooling="mean"), r"pooling='mean' is a classifier setting; got task='causal_lm'"),
    (dict(pooling="cls"), r"pooling='cls' is a classifier setting; got task=None"),
])
def test_bad_pooling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load("minilm-l6", **kwargs)


def test_masked_mean_by_hand():
    h = np.arange(2 * 3 * 2, dtype="float32").reshape(2, 3, 2)  # [[0,1],[2,3],[4,5]], [[6,7],[8,9],[10,11]]
    mask = np.array([[True, True, False], [False, False, False]])
    out = np.asarray(MaskedMeanPooling()(h, mask))
    np.testing.assert_array_equal(out, [[1.0, 2.0], [0.0, 0.0]])  # mean of the first two tokens; no token: zeros
    np.testing.assert_array_equal(np.asarray(MaskedMeanPooling()(h)), h.mean(axis=1))


def test_mean_pooling_is_the_masked_mean_of_the_backbone_output(mean_classifier, tokens):
    assert tokens["padding_mask"].sum(axis=1).tolist() != [16] * len(SENTENCES)  # padding present: the mask matters
    sequence = np.asarray(mean_classifier.backbone(tokens)["sequence_output"])  # (B, T, C)
    mask = tokens["padding_mask"].astype("float64")[..., None]
    expected = (sequence * mask).sum(axis=1) / mask.sum(axis=1)  # by hand, in float64
    pooled = keras.Model(mean_classifier.inputs, mean_classifier.get_layer("mean_pooling").output)
    np.testing.assert_allclose(np.asarray(pooled(tokens)), expected, rtol=0, atol=1e-6)
    dense = mean_classifier.get_layer("logits")
    logits = expected @ np.asarray(dense.kernel) + np.asarray(dense.bias)
    np.testing.assert_allclose(np.asarray(mean_classifier(tokens)), logits, rtol=0, atol=1e-5)  # 384-term sums in float32


@pytest.mark.slow
def test_injected_mean_classifier_is_exact_and_round_trips(tmp_path, tokens):
    clf = load("minilm-l6", task="classifier", num_classes=3, sequence_length=16)
    before = np.asarray(clf(tokens))
    clf = inject(clf, rank=2, trainable=["logits"])
    np.testing.assert_array_equal(np.asarray(clf(tokens)), before)  # exact at insertion
    frozen = FrozenSnapshot(clf)
    rng = np.random.default_rng(0)
    for w in clf.trainable_weights:  # as if trained (fit on this classifier: tests/recipes/test_finetune.py)
        if "lora" in w.path:
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    assert frozen.changed(clf) == []
    on = {**tokens, "control": np.ones((len(SENTENCES), 1), "float32")}
    off = {**tokens, "control": np.zeros((len(SENTENCES), 1), "float32")}
    assert not np.array_equal(np.asarray(clf(on)), before)
    np.testing.assert_array_equal(np.asarray(clf(off)), before)  # the neutral control: the base exactly

    clf.save(tmp_path / "clf.keras")
    loaded = keras.models.load_model(tmp_path / "clf.keras", compile=False)
    assert type(loaded).__name__ == "InjectedMeanPooledTextClassifier" and pooling_of(loaded) == "mean"
    np.testing.assert_array_equal(np.asarray(loaded(on)), np.asarray(clf(on)))
    np.testing.assert_array_equal(np.asarray(loaded(off)), before)
    with pytest.raises(ValueError, match="with_pooling: this InjectedMeanPooledTextClassifier is injected; choose the pooling first"):
        with_pooling(clf, "cls")
