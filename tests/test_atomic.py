"""`atomic_dir`: a folder appears whole or not at all, and a complete folder is never lost."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keras_biasinject import atomic

from keras_biasinject.atomic import STALE_SECONDS, atomic_dir, recover, recover_all


def _write(folder, text):
    (folder / "a.txt").write_text(text)


def test_the_folder_appears_only_when_the_block_ends(tmp_path):
    final = tmp_path / "out" / "v1"
    with atomic_dir(final) as tmp:
        _write(tmp, "new")
        assert not final.exists() and tmp.name.startswith(".v1.partial-")  # hidden from readers
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v1"]  # nothing left beside it
    assert os.listdir(final) == ["a.txt"]  # nor the writer's lock file inside it


def test_an_error_in_the_block_leaves_the_old_folder_and_no_partial(tmp_path):
    final = tmp_path / "v1"
    with atomic_dir(final) as tmp:
        _write(tmp, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final, overwrite=True) as tmp:
            _write(tmp, "half")
            raise RuntimeError("disk full (simulated)")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_existing_folders_are_replaced_only_when_asked(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    _write(final, "old")
    with pytest.raises(FileExistsError, match="v1' exists; it was not replaced"):
        with atomic_dir(final) as tmp:
            _write(tmp, "new")
    assert (final / "a.txt").read_text() == "old"
    with atomic_dir(final, keep_existing=True) as tmp:  # another process built it first: keep theirs
        _write(tmp, "new")
    assert (final / "a.txt").read_text() == "old"
    with atomic_dir(final, overwrite=True) as tmp:
        _write(tmp, "new")
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    # What a writer killed after moving the old folder aside, before renaming the new one, leaves.
    final = tmp_path / "state"
    aside = tmp_path / ".state.old-x1"
    (aside / "state").mkdir(parents=True)
    _write(aside / "state", "complete")
    partial = tmp_path / ".state.partial-x2"
    partial.mkdir()
    _write(partial, "torn")
    recover(final)
    assert (final / "a.txt").read_text() == "complete"
    assert not aside.exists()
    assert partial.exists()  # young: it may be another writer's, so it stays (and is never read)
    old = time.time() - STALE_SECONDS - 10
    os.utime(partial, (old, old))
    recover(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_folders_get_the_umask_mode_not_tempfile_0700(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "v1") as tmp:
            _write(tmp, "new")
    finally:
        os.umask(old)
    assert (tmp_path / "v1").stat().st_mode & 0o777 == 0o750  # as a plain mkdir under umask 0o027
    assert (tmp_path / "v1" / "a.txt").stat().st_mode & 0o777 == 0o640


def test_a_partial_folder_of_a_dead_writer_is_removed_at_once_and_a_live_ones_kept(tmp_path):
    dead = killed_writer(tmp_path / "7")  # young, but its writer is gone
    with atomic_dir(tmp_path / "8") as tmp:
        live = tmp_path / tmp.name  # this process's own write in progress
        foreign = tmp_path / ".7.partial-00000000-1-abcd"  # another host's writer: only its age counts
        os.mkdir(foreign)
        recover_all(tmp_path)
        assert live.is_dir() and foreign.is_dir() and not dead.exists()
    (tmp_path / ".3.partial-x9").mkdir()  # another name, the old naming: old ones go
    old = time.time() - STALE_SECONDS - 10
    for name in (".3.partial-x9", foreign.name):
        os.utime(tmp_path / name, (old, old))
    recover_all(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["8"]


# A child process that loads atomic.py alone (no TensorFlow), so it starts in milliseconds.
LOAD_ATOMIC = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
"""

# A writer killed inside an `atomic_dir` block.
KILLED_WRITER = LOAD_ATOMIC + """
with atomic.atomic_dir(sys.argv[2]) as tmp:
    (tmp / "half.txt").write_text("torn")
    os._exit(9)  # killed mid-write: no cleanup runs
"""


def killed_writer(final):
    """Runs a writer of `final` that dies inside the block, in a child process; returns the partial folder it left."""
    final = Path(final)
    subprocess.run([sys.executable, "-c", KILLED_WRITER, atomic.__file__, str(final)], timeout=60)
    (partial,) = final.parent.glob(f".{final.name}.partial-*")
    return partial


# A writer that blocks inside an `atomic_dir` block until its stdin closes: a long export in progress.
LIVE_WRITER = LOAD_ATOMIC + """
with atomic.atomic_dir(sys.argv[2]) as tmp:
    (tmp / "half.txt").write_text("in progress")
    print(tmp, flush=True)
    sys.stdin.read()
"""


def test_a_live_writers_old_partial_folder_is_kept_and_removed_once_it_is_killed(tmp_path):
    argv = [sys.executable, "-c", LIVE_WRITER, atomic.__file__, str(tmp_path / "9")]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as writer:
        try:
            partial = Path(writer.stdout.readline().strip())
            two_hours_ago = time.time() - 2 * 3600  # beyond STALE_SECONDS: its age alone would call it dead
            os.utime(partial, (two_hours_ago, two_hours_ago))
            recover_all(tmp_path)
            assert (partial / "half.txt").read_text() == "in progress"  # its writer holds the lock: kept
        finally:
            writer.kill()
    recover_all(tmp_path)  # the lock died with the process: removed at once
    assert list(tmp_path.iterdir()) == []
