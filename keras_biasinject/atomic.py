"""Folders that appear whole or not at all: write beside the destination, then rename into place.

Every folder this package publishes (a converted checkpoint or data set in the cache, an adapter,
a SavedModel version that TF Serving may pick up, a training backup) is written with `atomic_dir`:

    with atomic_dir("serving/reviews/3", overwrite=True) as tmp:
        write_files_into(tmp)            # nothing at serving/reviews/3 changes until the block ends

The temporary folder is hidden (`.NAME.partial-XXXX`: TF Serving and every reader here skip it)
and deleted on an exception. Replacing an existing folder takes two renames, the old one first to
`.NAME.old-XXXX`; a process killed between them leaves the old folder there, and `recover(final)`
(called at the start of every `atomic_dir`) puts it back, so a complete folder is never lost.
This module imports nothing else of keras_biasinject.
"""

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

STALE_SECONDS = 3600  # a partial folder untouched this long was left by a killed writer


def _hidden(final, kind):
    return sorted(final.parent.glob(f".{final.name}.{kind}-*"))


def recover(final):
    """Puts back a folder that a killed `atomic_dir` had moved aside; removes stale partial folders.

    Safe to call at any time, by readers too (a backup is recovered before it is loaded)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    olds = _hidden(final, "old")
    moved_aside = [old / final.name for old in olds if (old / final.name).exists()]
    if moved_aside and not final.exists():
        os.replace(moved_aside[-1], final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for stale in _hidden(final, "partial"):
        # A young one may be another process's write in progress, so only old ones go.
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder):
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(final, overwrite=False, keep_existing=False):
    """Yields a temporary folder beside `final`; when the block ends without an error, its files are
    synced and it becomes `final` in one rename.

    If `final` exists when the block ends: `overwrite=True` replaces it (the old folder stays whole
    until the new one is in place); `keep_existing=True` keeps it and discards the new copy (another
    process built the same thing first, as in the cache); otherwise `FileExistsError`. On an
    exception the temporary folder is deleted and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, final, overwrite, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp, final, overwrite, keep_existing):
    if final.exists():
        if keep_existing and not overwrite:
            return
        if not overwrite:
            raise FileExistsError(f"{str(final)!r} exists; it was not replaced.")
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, final)
    except OSError:  # a non-empty folder appeared there meanwhile
        if not (keep_existing and final.is_dir()):
            raise
