"""Folders that appear whole or not at all: write beside the destination, then rename into place.

Every folder this package publishes (a converted checkpoint or data set in the cache, an adapter,
a SavedModel version that TF Serving may pick up, a training backup) is written with `atomic_dir`:

    with atomic_dir("serving/reviews/3", overwrite=True) as tmp:
        write_files_into(tmp)            # nothing at serving/reviews/3 changes until the block ends

The temporary folder is hidden (`.NAME.partial-HOST-PID-XXXX`: TF Serving and every reader here
skip it), made with the mode a plain `mkdir` gives (0o777 less the umask), and deleted on an
exception. Its writer holds an exclusive `flock` on a lock file inside it (`LOCK_FILE`) for as long
as it writes; the lock dies with the process. A partial folder left by a killed writer is removed by
the next `recover` of its name (or `recover_all` of its parent folder) once it is stale: its lock
can be taken (the writer is gone, whatever its host or PID namespace, on a filesystem shared with
it), or, for a folder without a lock file (written where `fcntl` is missing, as on Windows, or by an
older version), it is untouched for `STALE_SECONDS`. The lock file is unlinked just before the final
rename (the writer still holds the lock), so it never reaches the published folder; that unlink
touches the folder, which then counts as young. Limits: on NFS, `flock` works across clients only
where the mount supports locks (not with `nolock`, where a writer on another client looks dead:
there, keep to one writing host per folder).
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

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; partial folders are judged by their age alone
    fcntl = None

STALE_SECONDS = 3600  # a partial folder without a lock file, untouched this long, was left by a killed writer
LOCK_FILE = ".atomic_dir.lock"  # inside a partial folder: locked by its writer while it lives
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # names a partial folder's host, for people


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
    """True when the writer of `partial` is gone: its lock file can be locked, or, without a lock file
    that can be tried, the folder is untouched for `STALE_SECONDS`."""
    held = _lock_held(partial / LOCK_FILE)
    if held is not None:
        return not held
    try:
        return time.time() - partial.stat().st_mtime > STALE_SECONDS
    except FileNotFoundError:  # its writer finished meanwhile
        return False


def _lock_held(lock):
    """True if a live process holds `lock`, False if none does, None if that cannot be told (no such
    file: the writer wrote none or is publishing; no fcntl; a filesystem without locks)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its writer holds it
        return True
    except OSError:  # no locks here (ENOLCK)
        return None
    finally:
        os.close(fd)  # releases the lock if this took it
    return False


def _make_partial(final):
    """A new hidden folder beside `final`, with the mode a plain `mkdir` gives (0o777 less the umask;
    `tempfile.mkdtemp` gives 0o700, which a group or a server user then cannot read), named after
    this host and this process; and the descriptor of the lock held on its lock file (None where
    locks are missing): close it only once the folder is renamed or removed."""
    while True:
        tmp = final.parent / f".{final.name}.partial-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:  # 1 in 4 billion: draw again
            continue
    try:
        return tmp, _lock(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _lock(folder):
    """Creates `folder/LOCK_FILE` already locked (locked under another name, then renamed, so that no
    one can ever take it while this process lives); returns its descriptor, or None without locks."""
    if fcntl is None:
        return None
    staging = folder / f"{LOCK_FILE}.new"
    fd = os.open(staging, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(staging, folder / LOCK_FILE)
    except OSError:  # a filesystem without locks: the age rule judges this folder
        os.close(fd)
        staging.unlink(missing_ok=True)
        return None
    return fd


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
    tmp, lock = _make_partial(final)
    try:
        yield tmp
        if lock is not None:
            (tmp / LOCK_FILE).unlink(missing_ok=True)  # not published; the lock stays held until the rename
        _fsync_tree(tmp)
        _publish(tmp, final, overwrite, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


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
