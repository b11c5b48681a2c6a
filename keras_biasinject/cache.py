"""The on-disk cache for converted checkpoints and built datasets, written atomically.

Everything the project builds at set-up time (a GGUF checkpoint converted to a Hugging Face folder,
a dataset extracted from a Debian package) lives under `cache_root()`, never in the repository.
A cache entry is a folder that appears in one `os.replace`: an interrupted build leaves only a
`*.partial-*` folder that no reader looks at and the next build removes.
"""

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path


def cache_root():
    """`$KBI_CACHE`, else `$XDG_CACHE_HOME/keras_biasinject`, else `~/.cache/keras_biasinject`."""
    if os.environ.get("KBI_CACHE"):
        return Path(os.environ["KBI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras_biasinject"


@contextlib.contextmanager
def atomic_dir(final):
    """Yield a temporary folder beside `final`; on success it is renamed to `final` in one step.

    On an exception the temporary folder is deleted and `final` is left as it was. If `final`
    already exists when the block ends (another process finished first), it is kept and the new
    copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}.partial-*"):
        # Left by a build that was killed; nobody reads these. A young one may be another
        # process's build in progress, so only folders untouched for an hour are removed.
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder):
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
