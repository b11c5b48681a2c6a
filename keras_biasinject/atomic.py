"""Folders that appear whole or not at all: write beside the destination, then rename into place.

Every folder this package publishes (a converted checkpoint or data set in the cache, an adapter,
a SavedModel version that TF Serving may pick up, a training backup) is written with `atomic_dir`:

    with atomic_dir("serving/reviews/3", overwrite=True) as tmp:
        write_files_into(tmp)            # nothing at serving/reviews/3 changes until the block ends

The temporary folder is hidden (`.NAME.partial-HOST-PID-XXXX`: TF Serving and every reader here
skip it), made with the mode a plain `mkdir` gives (0o777 less the umask), and deleted on an
exception. A partial folder left by a killed writer is removed by the next `recover` of its name
(or `recover_all` of its parent folder) once it is stale: its writer's process (same host, named in
the folder's name) is gone, or it is untouched for `STALE_SECONDS` (a writer on another host).
Replacing an existing folder takes two renames, the old one first to `.NAME.old-XXXX`; a process
killed between them leaves the old folder there, and `recover(final)` (called at the start of every
`atomic_dir`) puts it back, so a complete folder is never lost.
This module imports nothing else of keras_biasinject.
"""

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

STALE_SECONDS = 3600  # a partial folder untouched this long was left by a killed writer
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # tells this host's pids from others'
_OWNER = re.compile(r"\.partial-([0-9a-f]{8})-([0-9]+)-")  # .NAME.partial-HOST-PID-XXXX


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
    for partial in _hidden(final, "partial"):
        if _is_stale(partial):  # a live writer's folder (a write in progress) stays
            shutil.rmtree(partial, ignore_errors=True)


def recover_all(folder):
    """`recover` for every name in `folder` that has a hidden `.NAME.old-*` or `.NAME.partial-*` beside
    it, such as the partial versions left by killed exports under `<base>/<name>`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    hidden = re.compile(r"\.(.+)\.(?:old|partial)-[^/]*")
    names = {m.group(1) for m in (hidden.fullmatch(p.name) for p in folder.iterdir()) if m}
    for name in sorted(names):
        recover(folder / name)


def _is_stale(partial):
    """True when the writer of `partial` is a dead process of this host, or it is untouched for
    `STALE_SECONDS` (its writer on another host, or a name without an owner)."""
    try:
        age = time.time() - partial.stat().st_mtime
    except FileNotFoundError:  # its writer finished meanwhile
        return False
    owner = _OWNER.search(partial.name)
    if owner and owner.group(1) == _HOST and not _pid_alive(int(owner.group(2))):
        return True
    return age > STALE_SECONDS


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: a check, nothing is sent
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process: alive; an absurd pid: not known
        return True
    return True


def _make_partial(final):
    """A new hidden folder beside `final`, with the mode a plain `mkdir` gives (0o777 less the umask;
    `tempfile.mkdtemp` gives 0o700, which a group or a server user then cannot read), named after
    this host and this process."""
    while True:
        tmp = final.parent / f".{final.name}.partial-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # 1 in 4 billion: draw again
            continue


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
    tmp = _make_partial(final)
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
