"""Where the project keeps what it builds at set-up time: converted checkpoints and data sets.

Everything lives under `cache_root()`, never in the repository. Entries are written with
`keras_biasinject.atomic.atomic_dir(entry, keep_existing=True)`: an interrupted build leaves only a
hidden partial folder that no reader looks at, and two processes building one entry keep the first.
"""

import os
from pathlib import Path


def cache_root():
    """`$KBI_CACHE`, else `$XDG_CACHE_HOME/keras_biasinject`, else `~/.cache/keras_biasinject`."""
    if os.environ.get("KBI_CACHE"):
        return Path(os.environ["KBI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras_biasinject"
