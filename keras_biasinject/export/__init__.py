"""Export for serving: TensorFlow SavedModels in TF Serving's layout (TensorFlow only)."""

from keras_biasinject.export.saved_model import export_saved_model, next_version

__all__ = ["export_saved_model", "next_version"]
