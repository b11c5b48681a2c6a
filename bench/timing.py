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
    """The backend and the device the figures were measured on: name, kind, versions."""
    import keras

    backend = keras.backend.backend()
    info = {"backend": backend, "keras": keras.__version__, "machine": platform.machine()}
    if backend == "jax":
        import jax

        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        info.update(jax=jax.__version__, gpus=[d.device_kind for d in accelerators])
    elif backend == "torch":
        import torch

        count = torch.cuda.device_count()
        info.update(torch=torch.__version__, gpus=[torch.cuda.get_device_name(i) for i in range(count)])
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        info.update(tensorflow=tf.__version__, gpus=names)
    info["device"] = f"GPU: {info['gpus'][0]}" if info["gpus"] else "CPU"
    if backend != "tensorflow":
        info["device"] += f", {backend}"
    return info


def write(name, data):
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path
