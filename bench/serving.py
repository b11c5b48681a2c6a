"""`kbi serve` under load: requests per second and p50/p99 latency at 1, 4 and 16 concurrent clients,
with one control for everyone and with 16 distinct controls, batched (`--batching`) and unbatched,
for the real MiniLM classifier (`:classify`, one review per request) and SmolLM2-135M generation
(`:generate`, 16 new tokens after "This tea is", greedy).

Each model is injected (rank 8, query/value, adapter weights random but non-zero: speed does not
depend on their values), exported with its preprocessor, and served by a real `kbi serve` process on
127.0.0.1, one server at a time (unbatched, then batched). Each client is a thread with its own
keep-alive connection that sends its requests one after another. Before timing, the batched and the
unbatched server answer the same 16 requests, and the largest difference is recorded (goal: 1e-5).
Goals: with batching at least 3x the requests per second at 16 clients; 16 distinct controls within
10% of the throughput with one.
It also times each signature alone at batch 1 and 16 (`signature_ceiling`): what batching can gain at most.
Run: python bench/serving.py [--requests 8] [--ceiling-only]  -> bench/results/serving.json
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from timing import device, write  # noqa: E402

CLIENTS = (1, 4, 16)
REVIEWS = [  # one per client; the classifier's preprocessor pads every review to 128 tokens
    "This tea is wonderful, smooth and fragrant. I buy it every month.", "Stale, bitter and overpriced. Never again.",
    "My dog loves these treats and they do not upset his stomach.", "The coffee arrived crushed and tasted burnt.",
    "Great snack for the office, not too sweet.", "The flavour is artificial and the texture is gummy.",
    "Best hot chocolate I have had in years.", "It was fine, nothing special, a bit too salty for me.",
    "Fresh, crunchy and the bag lasts a week.", "The package was half empty when it arrived.",
    "My kids ask for these every day.", "Too much sugar; I could not finish the box.",
    "Perfect with milk in the morning.", "Smells wonderful but tastes of cardboard.",
    "A good price for organic oats.", "The seal was broken and the nuts were rancid.",
]
GOALS = {"batched_vs_unbatched_rps_16_clients": 3.0, "distinct_vs_one_control_rps": 0.9, "max_abs_diff": 1e-5}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exports(folder):
    """{"minilm": export folder, "smollm2": export folder}, each with its preprocessor."""
    from keras_biasinject import inject
    from keras_biasinject.export import export_saved_model
    from keras_biasinject.models import load

    rng = np.random.default_rng(0)
    clf = inject(load("minilm-l6", task="classifier", num_classes=2, sequence_length=128), rank=8, targets="query_value")
    lm = inject(load("smollm2-135m", task="causal_lm"), rank=8, targets="query_value")
    lm.compile(sampler="greedy")
    out = {}
    for name, model in (("minilm", clf), ("smollm2", lm)):
        for v in model.trainable_weights:
            v.assign(rng.normal(scale=0.02, size=v.shape).astype("float32"))
        export_saved_model(model, folder, name)
        out[name] = Path(folder) / name
    return out


class Server:
    def __init__(self, export, batched, log):
        self.port = free_port()
        flags = ["--batching", "--batch-max-size", "16", "--batch-wait-ms", "5"] if batched else []
        self.process = subprocess.Popen([sys.executable, "-m", "keras_biasinject.cli.main", "serve", str(export), "--port",
                                         str(self.port), "--store", str(Path(log.name).with_suffix(".sqlite")), *flags],
                                        stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kbi serve exited; see {log.name}")
            try:
                if post(self.port, "GET", f"/v1/models/{export.name}", None)[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("kbi serve did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def post(port, method, path, body, connection=None):
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if own:
        connection.close()
    return response.status, answer


def body_for(model, k, distinct):
    control = [float(np.linspace(-1.0, 1.0, 16)[k % 16])] if distinct else [0.7]
    if model == "minilm":
        return "/v1/models/minilm:classify", {"text": REVIEWS[k % 16], "control": control}
    return "/v1/models/smollm2:generate", {"prompt": "This tea is", "max_tokens": 16, "control": control}


def load_run(port, model, clients, distinct, requests):
    """(requests per second, p50 ms, p99 ms): `clients` threads, `requests` each, after one warm-up each."""
    latencies, errors = [], []
    barrier = threading.Barrier(clients + 1)

    def client(k):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        path, body = body_for(model, k, distinct)
        post(port, "POST", path, body, connection)  # warm-up (and the connection)
        barrier.wait()
        for _ in range(requests):
            start = time.perf_counter()
            status, answer = post(port, "POST", path, body, connection)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(answer)
        connection.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ms = sorted(1000 * x for x in latencies)
    return {"requests_per_s": len(latencies) / wall, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "requests": len(latencies)}


def answers(port, model):
    """The 16 distinct-control answers, sent concurrently (so that a batching server gathers them)."""
    out = [None] * 16

    def one(k):
        path, body = body_for(model, k, True)
        out[k] = post(port, "POST", path, body)[1]

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def difference(a, b, model):
    if model == "minilm":
        return max(float(np.max(np.abs(np.array(x["probabilities"]) - np.array(y["probabilities"])))) for x, y in zip(a, b))
    return 0.0 if [x["text"] for x in a] == [y["text"] for y in b] else float("inf")


def ceiling(paths, rounds=5):
    """What batching can gain at most: rows per second of each model's signature alone, in this process
    (no HTTP, no tokenizing), at batch 1 and 16, calls interleaved, medians."""
    from timing import interleaved, summary

    from keras_biasinject.serving.app import SessionServer
    from keras_biasinject.serving.models import LoadedExport
    from keras_biasinject.serving.text import numpy

    out = {}
    for model, path in paths.items():
        export = LoadedExport(path)
        pre = export.preprocessor()
        fns = {}
        for n in (1, 16):
            control = {"control": np.full((n, 1), 0.7, "float32")}
            if model == "minilm":
                x = {k: v for k, v in numpy(pre(REVIEWS[:n])).items() if k in export.specs["serve"]}
                inputs, signature = {**x, **control}, "serve"
            else:
                prompt_tokens = int(numpy(pre.generate_preprocess(["This tea is"]))["padding_mask"].sum())
                x = numpy(pre.generate_preprocess(["This tea is"] * n, sequence_length=prompt_tokens + 16))
                inputs, signature = {**x, **control}, "generate"
            fns[n] = (lambda i, s: (lambda: SessionServer.run_signature(export, s, i)))(inputs, signature)
        times = summary(interleaved(fns, rounds=rounds, warmup=1))
        out[model] = {f"batch {n}": {"median_ms": t["median_ms"], "rows_per_s": n / (t["median_ms"] / 1000)} for n, t in times.items()}
        out[model]["batch 16 vs batch 1 rows_per_s"] = out[model]["batch 16"]["rows_per_s"] / out[model]["batch 1"]["rows_per_s"]
        print(model, out[model], flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8, help="requests per client and configuration (SmolLM2: a quarter)")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the signatures' rows/s at batch 1 and 16, added to an existing bench/results/serving.json")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="kbi-bench-serving-")
    paths = exports(folder)
    if args.ceiling_only:
        path = Path(__file__).resolve().parent / "results" / "serving.json"
        result = json.loads(path.read_text())
        result["signature_ceiling"] = ceiling(paths)
        write("serving", result)
        return
    results, diffs = {}, {}
    for model, export in paths.items():
        requests = args.requests if model == "minilm" else max(1, args.requests // 4)
        replies = {}
        for batched in (False, True):
            with open(Path(folder) / f"{model}-{batched}.log", "w") as log:
                server = Server(export, batched, log)
                try:
                    replies[batched] = answers(server.port, model)
                    for clients in CLIENTS:
                        for distinct in (False, True):
                            key = f"{model} {'batched' if batched else 'unbatched'} {clients} clients {'16 controls' if distinct else '1 control'}"
                            results[key] = load_run(server.port, model, clients, distinct, requests)
                            print(key, results[key], flush=True)
                finally:
                    server.stop()
        diffs[model] = difference(replies[False], replies[True], model)

    def rps(model, batched, clients, distinct):
        return results[f"{model} {'batched' if batched else 'unbatched'} {clients} clients {'16 controls' if distinct else '1 control'}"]["requests_per_s"]

    summary = {model: {
        "batched_vs_unbatched_rps_16_clients": {c: rps(model, True, 16, c == "16 controls") / rps(model, False, 16, c == "16 controls")
                                                for c in ("1 control", "16 controls")},
        "distinct_vs_one_control_rps_16_clients_batched": rps(model, True, 16, True) / rps(model, True, 16, False),
        "max_abs_diff_batched_vs_unbatched": diffs[model],
    } for model in paths}
    signature_ceiling = ceiling(paths)
    write("serving", {"signature_ceiling": signature_ceiling, "models": {"minilm": "all-MiniLM-L6-v2 classifier, 128 tokens, :classify",
                                 "smollm2": "SmolLM2-135M-Instruct fp32, 16 new tokens, :generate"},
                      "batching": {"max_size": 16, "wait_ms": 5}, "requests_per_client": {"minilm": args.requests,
                      "smollm2": max(1, args.requests // 4)}, "runs": results, "summary": summary, "goals": GOALS, **device()})


if __name__ == "__main__":
    main()
