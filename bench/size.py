"""Trainable parameters and adapter file size against the base model's, for the real checkpoints.
Run: python bench/size.py  -> bench/results/size.json"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from timing import write  # noqa: E402

from keras_biasinject import inject, save_adapter  # noqa: E402
from keras_biasinject.models import load  # noqa: E402


def main():
    rows = {}
    for name, task in (("minilm-l6", "classifier"), ("smollm2-135m", "causal_lm")):
        model = load(name, task=task, **({"num_classes": 2} if task == "classifier" else {}))
        base_params = int(sum(np.prod(w.shape) for w in model.weights))
        base_bytes = int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights))
        model = inject(model, rank=8, targets="query_value")
        with tempfile.TemporaryDirectory() as tmp:
            path = save_adapter(model, os.path.join(tmp, "adapter"))
            adapter_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        rows[name] = {
            "base_params": base_params, "trainable_params": model.injection.trainable_params,
            "trainable_share": model.injection.trainable_params / base_params,
            "base_weight_bytes": base_bytes, "adapter_folder_bytes": adapter_bytes,
            "size_ratio": adapter_bytes / base_bytes, "adapted_layers": len(model.injection.paths),
        }
        print(name, rows[name])
    write("size", {"rank": 8, "targets": "query_value", "models": rows})


if __name__ == "__main__":
    main()
