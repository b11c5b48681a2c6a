"""Exactness at insertion, per supported backbone family: max |injected - original| over random
token ids and random controls (must be 0.0). Run: python bench/exactness.py [--out NAME]"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
from timing import device, write  # noqa: E402

from keras_biasinject import inject  # noqa: E402
from tests.rewrite.tiny_models import TINY, family_inputs, takes_per_token, widest  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="exactness", help="results file name under bench/results/ (default: exactness)")
    args = parser.parse_args()
    rows = {}
    rng = np.random.default_rng(0)
    for family, spec in TINY.items():
        keras.utils.set_random_seed(0)
        backbone = getattr(keras_hub.models, spec.backbone)(**spec.kwargs)
        x = family_inputs(family, batch=3, seq=12, seed=int(rng.integers(1 << 30)))
        before = keras.tree.map_structure(keras.ops.convert_to_numpy, backbone(x))
        injected = inject(backbone, targets=widest(family), rank=4, control_dim=2)
        diffs = []
        for c in (rng.normal(size=(3, 2)), rng.normal(size=(3, 12, 2)) * 10)[: 2 if takes_per_token(family) else 1]:
            after = keras.tree.map_structure(keras.ops.convert_to_numpy, injected({**x, "control": c.astype("float32")}))
            diffs += [float(np.max(np.abs(np.float64(a) - np.float64(b)))) for a, b in zip(keras.tree.flatten(after), keras.tree.flatten(before))]
        rows[family] = {"max_abs_diff": max(diffs), "adapted_layers": len(injected.injection.paths), "targets": widest(family)}
        print(family, rows[family])
    write(args.out, {"targets": "all-linear where the family has it (see each row)", "rank": 4, "control_dim": 2, "families": rows,
                        "all_exact": all(r["max_abs_diff"] == 0.0 for r in rows.values()), **device()})


if __name__ == "__main__":
    main()
