"""`export_onnx`: an encoder classifier as an ONNX file, through `tf2onnx` (optional extra `onnx`)."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from keras_biasinject.export.saved_model import check_writable, export_saved_model


def export_onnx(model, path, *, opset=17, control=None, overwrite=False):
    """Writes `model`'s `serve` signature (inputs and outputs as in the SavedModel) to `path`.

    The conversion runs `python -m tf2onnx.convert` on a temporary SavedModel; the file appears in
    one rename. Check it with onnxruntime: `onnxruntime.InferenceSession(path).run(None, inputs)`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"export_onnx: {str(path)!r} is a folder; give the path of the .onnx file to write (kbi export --onnx)."
        )
    check_writable(path.parent, "export_onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"export_onnx: {str(path)!r} exists. Pass overwrite=True to replace it.")
    if importlib.util.find_spec("tf2onnx") is None:  # the conversion runs in a subprocess: no import here
        raise ImportError("export_onnx needs tf2onnx: pip install 'keras-biasinject[onnx]'.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.partial-") as tmp:
        saved = export_saved_model(model, tmp, "model", 1, control=control)
        out = Path(tmp) / "model.onnx"
        result = subprocess.run(
            [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved, "--signature_def", "serve",
             "--opset", str(opset), "--output", str(out)],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not out.is_file():
            raise RuntimeError(f"export_onnx: tf2onnx failed:\n{result.stderr[-3000:]}")
        os.replace(out, path)
    return str(path)
