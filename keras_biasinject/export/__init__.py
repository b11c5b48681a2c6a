"""Export for serving: TensorFlow SavedModels in TF Serving's layout, and ONNX (TensorFlow only)."""

from keras_biasinject.export.onnx import export_onnx
from keras_biasinject.export.saved_model import export_saved_model, next_version

__all__ = ["export_onnx", "export_saved_model", "next_version"]
