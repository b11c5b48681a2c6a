import collections
import os
import subprocess
import sys
import textwrap
import time

import pytest

from keras_biasinject.data.builders import AUSTEN_BOOKS, load_dataset, prepared_builder, split_paragraphs

FIRST_TRAIN_REVIEW = "this stuff is  not stuffing  its  not good at all  save your money"


def _examples(builder, split):
    return list(builder.as_dataset(split=split).as_numpy_iterator())


def test_fine_foods_counts_and_labels(built):
    builder = built["small_fine_foods"]
    assert builder.info.features["label"].names == ["great", "other"]
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4000, "test": 1000}
    train, test = _examples(builder, "train"), _examples(builder, "test")
    assert collections.Counter(int(x["label"]) for x in train) == {0: 2600, 1: 1400}
    assert collections.Counter(int(x["label"]) for x in test) == {0: 658, 1: 342}
    # R's row order is kept: the first training row of modeldata's `training_data`.
    assert train[0] == {"review": FIRST_TRAIN_REVIEW.encode(), "product": b"B000J0LSBG", "label": 1}
    assert test[0]["review"].startswith(b"These are the best tasting gummy fruits")
    mean_length = sum(len(x["review"]) for x in train) / len(train)
    assert 300 < mean_length < 500  # "about 400 characters each"


def test_jane_austen_paragraphs_and_held_out_tail(built):
    builder = built["jane_austen"]
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 9271, "test": 1027}
    train, test = _examples(builder, "train"), _examples(builder, "test")
    counts = collections.Counter((split, x["book"].decode()) for split, xs in (("train", train), ("test", test)) for x in xs)
    titles = list(AUSTEN_BOOKS.values())
    for title in titles:
        n_test = counts[("test", title)]
        assert n_test == int((counts[("train", title)] + n_test) * 0.1)  # the last 10% of each book
    assert (counts[("train", "Emma")], counts[("test", "Emma")]) == (2139, 237)
    # Reading order: books in janeaustenr's order, each book's tail in the test split.
    assert [x["book"].decode() for x in train[:1]] == ["Sense & Sensibility"]
    assert train[3]["text"] == b"CHAPTER 1"
    assert train[4]["text"].startswith(b"The family of Dashwood had long been settled in Sussex.  Their estate was large,")
    assert list(dict.fromkeys(x["book"].decode() for x in test)) == titles
    total = sum(len(x["text"]) for x in train + test)
    assert total == 4_001_727  # about 4 MB of text


def test_split_paragraphs():
    lines = ["", "It is a truth ", "universally acknowledged.", "", "", "  Chapter 2", " "]
    assert split_paragraphs(lines) == ["It is a truth universally acknowledged.", "Chapter 2"]
    assert split_paragraphs([]) == []


def test_load_by_name_reuses_the_build(built, kbi_cache, monkeypatch):
    monkeypatch.setenv("KBI_CACHE", str(kbi_cache))
    start = time.perf_counter()
    ds = load_dataset("small_fine_foods", "test[:10]")
    assert time.perf_counter() - start < 5  # no rebuild (a build takes seconds and a download)
    assert [x["product"] for x in ds.take(2).as_numpy_iterator()] == [b"B005GXFP60", b"B000G7V394"]
    with pytest.raises(ValueError, match=r"Data set 'small_fine_foods' has no split 'validation'. Splits: \['test', 'train'\]"):
        load_dataset("small_fine_foods", "validation")
    with pytest.raises(ValueError, match=r"Unknown data set name='imdb'. Known: \['jane_austen', 'small_fine_foods'\]"):
        load_dataset("imdb", "train")


@pytest.mark.slow
def test_new_process_reads_the_build_without_apt(built, kbi_cache, tmp_path):
    script = textwrap.dedent("""
        import tensorflow_datasets as tfds
        from keras_biasinject.data.builders import load_dataset, tfds_dir
        n = sum(1 for _ in load_dataset("jane_austen", "test"))
        builder = tfds.builder_from_directory(str(tfds_dir() / "small_fine_foods" / "1.0.0"))
        first = next(iter(builder.as_dataset(split="train")))["product"].numpy().decode()
        print(n, builder.info.splits["train"].num_examples, first)
    """)
    env = {**os.environ, "KBI_CACHE": str(kbi_cache), "PATH": str(tmp_path)}  # no apt-get, no dpkg-deb
    env.pop("KBI_DEB_DIR", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["1027", "4000", "B000J0LSBG"]


@pytest.mark.slow
def test_failed_build_leaves_nothing_that_reads_as_complete(debs, tmp_path):
    data_dir = tmp_path / "tfds"
    # The janeaustenr package has no modeldata inside: the build fails after TFDS started writing.
    with pytest.raises(FileNotFoundError, match=r"No R lazy-load file '.*modeldata/data/Rdata.rdb'"):
        prepared_builder("small_fine_foods", data_dir=data_dir, deb_path=debs["r-cran-janeaustenr"])
    assert sorted(p.name for p in (data_dir / "small_fine_foods").iterdir()) == []
    builder = prepared_builder("small_fine_foods", data_dir=data_dir, deb_path=debs["r-cran-modeldata"])
    assert builder.info.splits["test"].num_examples == 1000


def test_stale_incomplete_builds_are_removed(built, kbi_cache):
    folder = kbi_cache / "tfds" / "jane_austen"
    stale, young = folder / "incomplete.OLD000_1.0.0", folder / "incomplete.NEW000_1.0.0"
    for path in (stale, young):
        path.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    prepared_builder("jane_austen", data_dir=kbi_cache / "tfds")
    assert (stale.exists(), young.exists()) == (False, True)
    young.rmdir()
