"""Exactness at insertion, per supported backbone family: max |injected - original| over random
token ids and random controls (must be 0.0). Run: python bench/exactness.py"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from timing import write  # noqa: E402

from keras_biasinject import inject  # noqa: E402
from tests.rewrite.tiny_models import TINY, V  # noqa: E402


def main():
    rows = {}
    rng = np.random.default_rng(0)
    for family, (cls, kwargs, extra, _) in TINY.items():
        keras.utils.set_random_seed(0)
        backbone = getattr(keras_hub.models, cls)(**kwargs)
        x = {"token_ids": rng.integers(1, V, (3, 12)), "padding_mask": np.ones((3, 12), "int32")}
        x.update({name: np.zeros((3, 12), "int32") for name in extra})
        before = keras.tree.map_structure(keras.ops.convert_to_numpy, backbone(x))
        injected = inject(backbone, targets="all-linear", rank=4, control_dim=2)
        diffs = []
        for c in (rng.normal(size=(3, 2)), rng.normal(size=(3, 12, 2)) * 10):
            after = keras.tree.map_structure(keras.ops.convert_to_numpy, injected({**x, "control": c.astype("float32")}))
            diffs += [float(np.max(np.abs(a - b))) for a, b in zip(keras.tree.flatten(after), keras.tree.flatten(before))]
        rows[family] = {"max_abs_diff": max(diffs), "adapted_layers": len(injected.injection.paths)}
        print(family, rows[family])
    write("exactness", {"targets": "all-linear", "rank": 4, "control_dim": 2, "families": rows,
                        "all_exact": all(r["max_abs_diff"] == 0.0 for r in rows.values())})


if __name__ == "__main__":
    main()
