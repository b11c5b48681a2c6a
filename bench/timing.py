"""Side-by-side timing: the methods take turns, round after round, so machine noise hits all alike."""

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(fns, rounds, warmup):
    """{name: [seconds per call]} timing each fn once per round, in turn, after `warmup` rounds."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: nobody always goes first
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summary(times):
    return {name: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t), "runs": len(t)} for name, t in times.items()}


def device():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {"device": "GPU" if gpus else "CPU", "gpus": [g.name for g in gpus], "machine": platform.machine(),
            "tensorflow": tf.__version__}


def write(name, data):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path
