"""Multi-device and multi-worker training end where one device ends (worker.py runs each process).

Every run trains the same injected tiny GPT-2 (no dropout) on the same 32 examples, global batch 4,
2 epochs. Tolerance 1e-5 between strategies: the replicas' gradients are summed in a different
order than one device's batch mean (measured: 9e-8). 1e-6 for a resumed run against an
uninterrupted one under the same strategy: the same operations in the same order.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
pytestmark = pytest.mark.distributed


def _ports(n=2):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ",".join(map(str, ports))


def _start(out, mode, *extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    return subprocess.Popen([sys.executable, WORKER, str(out), mode, *map(str, extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=120):
    try:
        for p in procs:
            output, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, output[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _weights(path):
    data = np.load(path)
    return {k: data[k] for k in data.files if k != "started"}, int(data["started"])


def _assert_close(a, b, atol):
    assert sorted(a) == sorted(b)
    assert int(a["steps"]) == int(b["steps"]) == 16
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith("lora_b"))  # the adapters did train


def _multi_worker(tmp_path, name, *extra):
    ports = _ports()
    outs = [tmp_path / f"{name}{i}.npz" for i in range(2)]
    procs = [_start(outs[i], "multi-worker", "--index", i, "--ports", ports, *extra) for i in range(2)]
    return procs, outs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.npz"
    _wait([_start(out, "single")])
    return _weights(out)[0]


def test_mirrored_on_two_cpu_devices_matches_one_device(tmp_path, single):
    _wait([_start(tmp_path / "mirrored.npz", "mirrored")])
    _assert_close(_weights(tmp_path / "mirrored.npz")[0], single, atol=1e-5)


def test_two_workers_match_one_process(tmp_path, single):
    procs, outs = _multi_worker(tmp_path, "w")
    _wait(procs)
    first, second = _weights(outs[0])[0], _weights(outs[1])[0]
    _assert_close(first, second, atol=0)  # the workers hold one set of weights, bit for bit
    _assert_close(first, single, atol=1e-5)


def test_killed_worker_resumes_from_last_step_backup(tmp_path):
    backup = tmp_path / "backup"
    # Uninterrupted reference, through the same fit_resumable path (backups written, none restored).
    procs, outs = _multi_worker(tmp_path, "ref", "--backup", tmp_path / "ref_backup", "--save-freq", 3)
    _wait(procs)
    reference, started = _weights(outs[0])
    assert started == 0
    # Worker 1 stalls after step 10 (epoch 2, batch 2); SIGKILL it there, then the stuck chief.
    procs, outs = _multi_worker(tmp_path, "run", "--backup", backup, "--save-freq", 3, "--stall-after", 10)
    deadline = time.time() + 120
    while not os.path.exists(f"{outs[1]}.stalled"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "worker 1 never reached step 10"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert (backup / "state" / "latest.weights.h5").is_file()  # the step-9 backup
    # A half-written checkpoint left by a kill during a save: must be ignored, never loaded.
    (backup / ".state.partial-killed").mkdir()
    (backup / ".state.partial-killed" / "latest.weights.h5").write_bytes(b"torn")
    procs, outs = _multi_worker(tmp_path, "resumed", "--backup", backup, "--save-freq", 3)
    _wait(procs)
    resumed, started = _weights(outs[0])
    assert started == 9  # resumed at the last backup (steps 3, 6, 9), not from the start
    _assert_close(resumed, reference, atol=1e-6)
    _assert_close(_weights(outs[1])[0], resumed, atol=0)
    assert not backup.exists()  # removed after the finished run
