"""GGUF files converted once into Hugging Face folders under `cache_root()/"checkpoints"`.

An entry is named after the file and a digest of (converter version, resolved path, size,
modification time): replacing or touching the GGUF file, or a new converter version, gives a new
entry. Entries are written with `atomic_dir`, so a folder under that name is always complete; a
conversion that was killed leaves only a hidden `.*.partial-*` folder, which no reader uses.
"""

import hashlib
from pathlib import Path

from keras_biasinject.atomic import atomic_dir
from keras_biasinject.cache import cache_root
from keras_biasinject.models.gguf import convert_gguf

# Bump when convert_gguf's output changes, so stale entries are not reused.
CONVERTER_VERSION = 1


def gguf_cache_entry(gguf_path):
    """The folder that holds (or will hold) the conversion of `gguf_path`; it may not exist yet."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = f"{CONVERTER_VERSION}|{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "checkpoints" / f"{gguf_path.stem}-{digest}"


def converted_gguf(gguf_path):
    """Path of a Hugging Face folder converted from `gguf_path`, converting it on first use.

    About 11 s and 540 MB of disk for SmolLM2-135M on 2 CPU cores; later calls return at once.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ValueError(f"gguf_path={str(gguf_path)!r} is not a file. Pass the path of a `.gguf` file.")
    entry = gguf_cache_entry(gguf_path)
    if not entry.is_dir():
        with atomic_dir(entry, keep_existing=True) as tmp:
            convert_gguf(gguf_path, tmp)
    return entry
