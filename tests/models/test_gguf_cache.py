"""converted_gguf: converted once, keyed by the file, and never a half-written entry."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from keras_biasinject.models import gguf as gguf_module
from keras_biasinject.models.gguf_cache import converted_gguf, gguf_cache_entry
from tests.models.tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KBI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"


@pytest.fixture
def gguf_file(tmp_path):
    expected, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    return tmp_path / "tiny.gguf", expected


def assert_complete(folder, expected):
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    weights = load_file(str(folder / "model.safetensors"))
    for name, want in expected.items():
        np.testing.assert_array_equal(weights[name], want, err_msg=name)


def test_converts_once_into_the_cache(cache, gguf_file):
    path, expected = gguf_file
    first = converted_gguf(path)
    assert first == gguf_cache_entry(path)
    assert first.parent == cache and first.name.startswith("tiny-")
    assert_complete(first, expected)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert converted_gguf(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not written again


def test_a_changed_file_gets_a_new_entry(cache, gguf_file):
    path, _ = gguf_file
    first = converted_gguf(path)
    expected, _ = write_tiny_gguf(path, seed=1)  # same name, new weights
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # coarse clocks
    second = converted_gguf(path)
    assert second != first
    assert_complete(second, expected)


def test_an_exception_mid_conversion_leaves_nothing(cache, gguf_file, monkeypatch):
    path, expected = gguf_file
    real_write_json = gguf_module._write_json

    def fail_on_tokenizer_config(target, obj):
        if Path(target).name == "tokenizer_config.json":
            raise OSError("disk full (simulated)")
        real_write_json(target, obj)

    monkeypatch.setattr(gguf_module, "_write_json", fail_on_tokenizer_config)
    with pytest.raises(OSError, match="simulated"):
        converted_gguf(path)
    assert list(cache.iterdir()) == []  # neither the entry nor a partial folder
    monkeypatch.undo()
    assert_complete(converted_gguf(path), expected)


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_entry_and_the_next_load_converts(cache, gguf_file):
    """SIGKILL right after the weights are written: no `finally` runs, as in a real crash."""
    path, expected = gguf_file
    script = textwrap.dedent(
        f"""
        import os, signal
        import safetensors.numpy
        from keras_biasinject.models.gguf_cache import converted_gguf

        real_save_file = safetensors.numpy.save_file

        def save_then_die(*args, **kwargs):
            real_save_file(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        safetensors.numpy.save_file = save_then_die
        converted_gguf({str(path)!r})
        """
    )
    env = {**os.environ, "KBI_CACHE": str(cache.parent), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    entry = gguf_cache_entry(path)
    assert not entry.exists()
    (partial,) = cache.glob(f".{entry.name}.partial-*")  # the interrupted build, which no reader uses
    assert (partial / "model.safetensors").is_file() and not (partial / "config.json").exists()

    from keras_biasinject.models import load

    backbone = load(path)  # converts afresh
    assert entry.is_dir()
    assert_complete(entry, expected)
    assert json.loads((entry / "config.json").read_text())["model_type"] == "llama"
    ids = np.array([[1, 60, 61]])
    out = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)})
    assert out.shape == (1, 3, 64)
