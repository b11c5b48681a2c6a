import numpy as np
import onnxruntime
import pytest

from keras_biasinject import inject
from keras_biasinject.data import DataConfig, make_dataset
from keras_biasinject.export import export_onnx
from keras_biasinject.models import load


@pytest.mark.slow
def test_minilm_classifier_through_tf2onnx_matches_onnxruntime(tmp_path):
    clf = inject(load("minilm-l6", task="classifier", num_classes=2, sequence_length=32), rank=4, trainable=["logits"])
    for v in clf.trainable_weights:  # non-zero adapter weights, so that the control matters
        v.assign(np.random.default_rng(len(v.path)).normal(scale=0.05, size=v.shape).astype("float32"))
    ds = make_dataset(DataConfig("small_fine_foods", text_column="review", label_column="label",
                                 control_map={"great": 1.0, "other": 1.0}, batch_size=4), clf.preprocessor, split="test[:4]")
    x, _ = next(iter(ds))
    x = {k: np.asarray(v) for k, v in x.items()}
    x["control"] = np.array([[1.0], [0.0], [0.5], [-1.0]], "float32")
    path = export_onnx(clf, tmp_path / "minilm.onnx")
    session = onnxruntime.InferenceSession(path)
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == ["control", "padding_mask", "segment_ids", "token_ids"]
    feeds = {n: x[n].astype("float32" if n == "control" else "int32") for n in names}
    logits, probabilities = session.run(["logits", "probabilities"], feeds)
    clf.preprocessor = None
    expected = np.asarray(clf(x))
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)  # the control changes the answer
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
    with pytest.raises(FileExistsError, match="exists. Pass overwrite=True"):
        export_onnx(clf, path)
