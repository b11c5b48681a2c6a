import bz2
import struct
import zlib

import numpy as np
import pytest

from keras_biasinject.data.r_lazyload import _decompress, lazyload_names, read_lazyload

AUSTEN = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]


def test_names(rdata_prefix):
    assert lazyload_names(rdata_prefix["janeaustenr"]) == AUSTEN
    names = lazyload_names(rdata_prefix["modeldata"])
    assert len(names) == 41
    assert {"training_data", "testing_data"} <= set(names)


def test_character_vector_zlib_entries(rdata_prefix):
    # janeaustenr's database is zlib-compressed (index `compressed` = 1): no type byte.
    emma = read_lazyload(rdata_prefix["janeaustenr"], ["emma"])["emma"]
    assert isinstance(emma, np.ndarray) and emma.shape == (16235,)
    assert list(emma[:3]) == ["EMMA", "", "By Jane Austen"]
    assert emma[14] == "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"


def test_data_frame_lzma_entries(rdata_prefix):
    # modeldata's database is xz-compressed (`compressed` = 3, type byte "Z", raw LZMA2).
    frames = read_lazyload(rdata_prefix["modeldata"], ["training_data", "testing_data"])
    train, test = frames["training_data"], frames["testing_data"]
    assert list(train.columns) == ["product", "review", "score"]
    assert (train.shape, test.shape) == ((4000, 3), (1000, 3))
    assert list(train["score"].cat.categories) == ["great", "other"]
    assert train["score"].value_counts().to_dict() == {"great": 2600, "other": 1400}
    assert test["score"].value_counts().to_dict() == {"great": 658, "other": 342}
    assert (train["product"].iloc[0], train["review"].iloc[0]) == (
        "B000J0LSBG", "this stuff is  not stuffing  its  not good at all  save your money")


@pytest.mark.parametrize("kind, pack", [(b"2", bz2.compress), (b"1", zlib.compress), (b"0", bytes)])
def test_other_type_bytes(kind, pack):
    payload = b"X\n" + bytes(range(256)) * 4
    entry = struct.pack(">I", len(payload)) + kind + pack(payload)
    assert _decompress(entry, 2, "test") == payload


def test_damaged_entries():
    payload = b"X\n" + b"abc" * 10
    with pytest.raises(ValueError, match=r"here: unknown compression type byte b'Q' \(expected Z, 2, 1 or 0\)"):
        _decompress(struct.pack(">I", len(payload)) + b"Q" + payload, 3, "here")
    with pytest.raises(ValueError, match=r"here: decompressed to 32 bytes, the entry says 33; the file is damaged"):
        _decompress(struct.pack(">I", len(payload) + 1) + zlib.compress(payload), 1, "here")


def test_unknown_object_and_missing_files(rdata_prefix, tmp_path):
    with pytest.raises(ValueError, match=r"holds no object \['pride'\]\. Objects present: \['emma', 'mansfieldpark'"):
        read_lazyload(rdata_prefix["janeaustenr"], ["emma", "pride"])
    with pytest.raises(FileNotFoundError, match=r"No R lazy-load file '.*Rdata.rdb'"):
        lazyload_names(tmp_path / "Rdata")
