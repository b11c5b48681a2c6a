import os

import numpy as np
import onnxruntime
import pytest

from keras_biasinject import inject
from keras_biasinject.data import DataConfig, make_dataset
from keras_biasinject.export import export_onnx
from keras_biasinject.models import load
from tests.rewrite.tiny_models import gpt2


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


def test_unwritable_onnx_paths_are_refused_before_the_conversion(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    model = gpt2()
    with pytest.raises(ValueError, match=r"export_onnx: .*a_file' is a file\. Choose another destination"):
        export_onnx(model, tmp_path / "a_file" / "model.onnx")
    with pytest.raises(ValueError, match=r"export_onnx: .*a_folder' is a folder; give the path of the .onnx file"):
        export_onnx(model, tmp_path / "a_folder", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"] and os.listdir(tmp_path / "a_folder") == []
