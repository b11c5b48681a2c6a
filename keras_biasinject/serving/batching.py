"""Dynamic batching: concurrent requests to one signature gathered into one call.

`Batcher.call(export, signature, tensors)` waits until the batch its request joins is full
(`max_size` rows) or the first request in it has waited `max_wait_s`. It then runs the signature
once on the rows of every request in the batch, each row with its own control, and hands each
request its own rows of every output. As TF Serving's batching does, only requests whose inputs
agree on everything but the batch axis are gathered (the same signature of the same loaded
version, the same sequence length); the others wait for a batch of their own.

The gathered call computes each row as the request alone would, up to the float rounding of a
different batch size (within 1e-5, tested). A batch that the model refuses as a whole runs again
request by request, so one request's bad input costs only that request.
"""

import threading
import time

import numpy as np


def check_batching(max_size, max_wait_s):
    """ValueError naming the flag unless `max_size` is an integer >= 1 and `max_wait_s` lies in [0, 10]."""
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"serve: --batch-max-size must be an integer >= 1. Got {max_size!r}.")
    if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s <= 10:
        raise ValueError(f"serve: --batch-wait-ms must be a number of milliseconds from 0 to 10000. Got {max_wait_s * 1000!r}.")


class _Pending:
    def __init__(self, key, tensors, rows):
        self.key, self.tensors, self.rows = key, tensors, rows
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.outputs = None
        self.error = None


class Batcher:
    """Gathers concurrent `call`s; `run(export, signature, {name: array})` -> {name: array} makes the
    signature call (the server's `run_signature`, which raises on input the model refuses)."""

    def __init__(self, run, max_size=32, max_wait_s=0.005):
        check_batching(max_size, max_wait_s)
        self.run = run
        self.max_size = max_size
        self.max_wait_s = float(max_wait_s)
        self.queue = []
        self.cv = threading.Condition()
        self.batches = 0  # signature calls made: fewer than requests when batching gathers them
        threading.Thread(target=self._loop, name="kbi-batcher", daemon=True).start()

    @staticmethod
    def key(export, signature, tensors):
        """What must agree for two requests to share a call: the loaded version, the signature, and
        every input's dtype and shape after the batch axis."""
        return (id(export), signature, tuple(sorted((k, str(v.dtype), tuple(v.shape[1:])) for k, v in tensors.items())))

    def call(self, export, signature, tensors):
        rows = int(next(iter(tensors.values())).shape[0])
        if rows >= self.max_size:  # a full batch by itself
            return self.run(export, signature, tensors)
        item = _Pending((self.key(export, signature, tensors), export, signature), tensors, rows)
        with self.cv:
            self.queue.append(item)
            self.cv.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.outputs

    def _take(self):
        """The next batch: the oldest request and the later ones with its key that fit, once they
        fill `max_size` rows or the oldest has waited `max_wait_s`."""
        with self.cv:
            while True:
                while not self.queue:
                    self.cv.wait()
                first = self.queue[0]
                same = [p for p in self.queue if p.key == first.key]
                waited = time.monotonic() - first.arrived
                if sum(p.rows for p in same) >= self.max_size or waited >= self.max_wait_s:
                    break
                self.cv.wait(self.max_wait_s - waited)
            batch, rows = [], 0
            for p in same:
                if rows + p.rows <= self.max_size:
                    batch.append(p)
                    rows += p.rows
            for p in batch:
                self.queue.remove(p)
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            self.batches += 1
            _, export, signature = batch[0].key
            try:
                if len(batch) == 1:
                    batch[0].outputs = self.run(export, signature, batch[0].tensors)
                else:
                    self._run_gathered(export, signature, batch)
            except BaseException as error:  # handed to the waiting request(s): the server answers them
                for p in batch:
                    if p.outputs is None and p.error is None:
                        p.error = error
            for p in batch:
                p.done.set()

    def _run_gathered(self, export, signature, batch):
        joined = {k: np.concatenate([np.asarray(p.tensors[k]) for p in batch]) for k in batch[0].tensors}
        try:
            outputs = self.run(export, signature, joined)
        except Exception:  # the model refused the batch: each request runs alone, and only a bad one fails
            for p in batch:
                try:
                    p.outputs = self.run(export, signature, p.tensors)
                except BaseException as error:
                    p.error = error
            return
        start = 0
        for p in batch:
            p.outputs = {k: v[start:start + p.rows] for k, v in outputs.items()}
            start += p.rows
