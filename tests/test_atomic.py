"""`atomic_dir`: a folder appears whole or not at all, and a complete folder is never lost."""

import os
import time

import pytest

from keras_biasinject.atomic import STALE_SECONDS, atomic_dir, recover


def _write(folder, text):
    (folder / "a.txt").write_text(text)


def test_the_folder_appears_only_when_the_block_ends(tmp_path):
    final = tmp_path / "out" / "v1"
    with atomic_dir(final) as tmp:
        _write(tmp, "new")
        assert not final.exists() and tmp.name.startswith(".v1.partial-")  # hidden from readers
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v1"]  # nothing left beside it


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
