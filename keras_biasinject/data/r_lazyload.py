"""Reading R's lazy-load databases (`Rdata.rdb` + `Rdata.rdx`) without R.

An installed R package keeps its data sets in `data/Rdata.rdb`, one compressed R serialization per
object, and the index `data/Rdata.rdx`: a gzip'd R serialization of a list whose `variables` entry
maps each object name to its (offset, length) in the `.rdb`. Each `.rdb` entry starts with the
uncompressed length as a 4-byte big-endian integer; then, when the index says `compressed` is 2 or
3, one type byte (`Z` raw LZMA2, `2` bzip2, `1` zlib, `0` stored), else (1) a zlib stream directly.
The `rdata` package turns the serialization into pandas data frames and numpy arrays.

    objects = read_lazyload(".../site-library/janeaustenr/data/Rdata", ["emma"])
"""

import bz2
import lzma
import struct
import zlib
from pathlib import Path

import rdata

# Tibbles are data frames with extra classes; without these entries rdata warns on each one.
_CLASSES = {
    **rdata.conversion.DEFAULT_CLASS_MAP,
    "tbl_df": rdata.conversion.dataframe_constructor,
    "tbl": rdata.conversion.dataframe_constructor,
}
# R compresses with xz preset 9e: the raw decoder needs the same dictionary settings.
_LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def lazyload_names(db_prefix):
    """The object names in the database at `db_prefix` (its path without .rdb/.rdx), sorted."""
    return sorted(_index(_paths(db_prefix)[1])[1])


def read_lazyload(db_prefix, names=None):
    """{name: object} for `names` (all objects when None): pandas DataFrames, numpy arrays, dicts."""
    rdb, rdx = _paths(db_prefix)
    compressed, variables = _index(rdx)
    names = sorted(variables) if names is None else list(names)
    unknown = [name for name in names if name not in variables]
    if unknown:
        raise ValueError(f"{str(rdb)!r} holds no object {unknown}. Objects present: {sorted(variables)}.")
    objects = {}
    with open(rdb, "rb") as f:
        for name in names:
            offset, length = variables[name]
            f.seek(offset)
            objects[name] = _convert(_decompress(f.read(length), compressed, f"{rdb}:{name}"))
    return objects


def _index(rdx):
    """(compression code, {name: (offset, length)}) from the `.rdx` index."""
    index = _convert(rdx.read_bytes())
    variables = {str(name): (int(where[0]), int(where[1])) for name, where in index["variables"].items()}
    return int(index["compressed"][0]), variables


def _decompress(entry, compressed, where):
    size = struct.unpack(">I", entry[:4])[0]
    kind = entry[4:5] if compressed in (2, 3) else b"1"
    body = entry[5:] if compressed in (2, 3) else entry[4:]
    if kind == b"Z":
        out = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_LZMA2).decompress(body)
    elif kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"1":
        out = zlib.decompress(body)
    elif kind == b"0":
        out = bytes(body)
    else:
        raise ValueError(f"{where}: unknown compression type byte {kind!r} (expected Z, 2, 1 or 0).")
    if len(out) != size:
        raise ValueError(f"{where}: decompressed to {len(out)} bytes, the entry says {size}; the file is damaged.")
    return out


def _convert(serialized):
    # The serialization has no file header ("X\n" format only): parse it as an .rds.
    return rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"), _CLASSES)


def _paths(db_prefix):
    prefix = Path(db_prefix)
    if prefix.suffix in (".rdb", ".rdx"):
        prefix = prefix.with_suffix("")
    rdb, rdx = prefix.with_suffix(".rdb"), prefix.with_suffix(".rdx")
    for path in (rdb, rdx):
        if not path.is_file():
            raise FileNotFoundError(
                f"No R lazy-load file {str(path)!r}. Pass the path of an R package's `data/Rdata` "
                "(without extension), from a Debian r-cran-* package unpacked with `extracted_package`."
            )
    return rdb, rdx
