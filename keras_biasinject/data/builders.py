"""TFDS builders for the two real data sets that install offline: Fine Foods reviews and Jane Austen.

Both are read from Debian's R data packages (see `debian.py`, `r_lazyload.py`), never from a hub.
`load_dataset` builds a data set on first use under `cache_root()/tfds` and reads it from there
afterwards. TFDS itself writes the build into an `incomplete.*` folder beside the version folder and
renames it into place at the end, so a killed build is never read as complete.

- `small_fine_foods` (Debian r-cran-modeldata, MIT; reviews from Stanford SNAP's Amazon Fine Foods):
  train 4,000 / test 1,000 reviews, features `review`, `product` (an Amazon product id) and `label`
  (ClassLabel great/other: 2,600/1,400 in train, 658/342 in test). In R the label column is named
  `score`; it holds only great/other, so it is kept once, as `label`. Examples keep R's row order.
- `jane_austen` (Debian r-cran-janeaustenr, MIT; the six novels): one example per paragraph
  (consecutive non-empty lines joined by a space; chapter headings are paragraphs too), features
  `text` and `book` (the title). The last 10% of each book's paragraphs form the `test` split (held
  out, for perplexity), the rest `train`, in reading order. Every book is in both splits.

    ds = load_dataset("small_fine_foods", "train")  # {"review", "product", "label"} per example
"""

import shutil
import time
from pathlib import Path

import tensorflow_datasets as tfds

from keras_biasinject.cache import cache_root
from keras_biasinject.data.debian import extracted_package
from keras_biasinject.data.r_lazyload import read_lazyload

R_LIBRARY = "usr/lib/R/site-library"  # where Debian's r-cran-* packages keep the R packages
FINE_FOODS_LABELS = ["great", "other"]  # R's factor levels, in order
AUSTEN_BOOKS = {  # R object name -> title, in the order of janeaustenr's `austen_books()`
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_TEST_FRACTION = 0.1  # the last 10% of each book's paragraphs are held out


def r_package_data(package, r_name, names, deb_path=None):
    """{name: object} from the data of R package `r_name` inside Debian package `package`."""
    with extracted_package(package, deb_path) as root:
        return read_lazyload(root / R_LIBRARY / r_name / "data" / "Rdata", names)


class _DebianBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder whose source is a Debian package; `deb_path` overrides apt (see `debian.py`)."""

    def __init__(self, *, deb_path=None, **kwargs):
        self._deb_path = deb_path
        super().__init__(**kwargs)


class SmallFineFoods(_DebianBuilder):
    """Amazon Fine Foods reviews from R's modeldata: 4,000 train / 1,000 test, labelled great/other."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From Debian r-cran-modeldata 1.1.0 (`small_fine_foods`)."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Amazon Fine Food reviews, as sampled in R's modeldata package.",
            features=tfds.features.FeaturesDict({
                "review": tfds.features.Text(),
                "product": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=FINE_FOODS_LABELS),
            }),
            supervised_keys=("review", "label"),
            disable_shuffling=True,
            homepage="https://snap.stanford.edu/data/web-FineFoods.html",
            license="MIT (R package modeldata)",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data comes from a Debian package
        frames = r_package_data("r-cran-modeldata", "modeldata", ["training_data", "testing_data"], self._deb_path)
        return {"train": self._generate_examples(frames["training_data"]),
                "test": self._generate_examples(frames["testing_data"])}

    def _generate_examples(self, frame):
        for i, (product, review, score) in enumerate(zip(frame["product"], frame["review"], frame["score"])):
            yield i, {"review": review, "product": product, "label": score}


class JaneAusten(_DebianBuilder):
    """Jane Austen's six novels from R's janeaustenr, one example per paragraph."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From Debian r-cran-janeaustenr 1.0.0; last 10% of each book held out."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Jane Austen's six completed novels, one paragraph per example.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "book": tfds.features.Text()}),
            disable_shuffling=True,
            homepage="https://github.com/juliasilge/janeaustenr",
            license="MIT (R package janeaustenr); the novels are in the public domain",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data comes from a Debian package
        books = r_package_data("r-cran-janeaustenr", "janeaustenr", list(AUSTEN_BOOKS), self._deb_path)
        train, test = [], []
        for name, title in AUSTEN_BOOKS.items():
            paragraphs = split_paragraphs(books[name])
            n_test = int(len(paragraphs) * AUSTEN_TEST_FRACTION)
            train += [(title, p) for p in paragraphs[: len(paragraphs) - n_test]]
            test += [(title, p) for p in paragraphs[len(paragraphs) - n_test:]]
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, pairs):
        for i, (title, text) in enumerate(pairs):
            yield i, {"text": text, "book": title}


def split_paragraphs(lines):
    """Paragraphs: runs of non-blank lines, each line stripped, joined by single spaces."""
    paragraphs, current = [], []
    for line in list(lines) + [""]:
        line = str(line).strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


BUILDERS = {"small_fine_foods": SmallFineFoods, "jane_austen": JaneAusten}


def tfds_dir():
    """Where `load_dataset` keeps built data sets: `cache_root()/tfds`."""
    return cache_root() / "tfds"


def prepared_builder(name, *, data_dir=None, deb_path=None):
    """The builder for `name`, built on first use (a Debian download and about 10 s), else read back."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown data set name={name!r}. Known: {sorted(BUILDERS)}.")
    data_dir = Path(data_dir) if data_dir is not None else tfds_dir()
    _remove_stale_builds(data_dir / name)
    builder = BUILDERS[name](data_dir=str(data_dir), deb_path=deb_path)
    # try_download_gcs=False: never ask TFDS's servers for a prebuilt copy (they hold none of ours).
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def load_dataset(name, split, *, data_dir=None, deb_path=None):
    """A `tf.data.Dataset` of feature dicts for split `split` ("train", "test", "train[:10%]", ...)."""
    builder = prepared_builder(name, data_dir=data_dir, deb_path=deb_path)
    if isinstance(split, str) and "+" not in split and split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"Data set {name!r} has no split {split!r}. Splits: {sorted(builder.info.splits)}.")
    return builder.as_dataset(split=split)


def _remove_stale_builds(folder):
    # TFDS leaves `incomplete.*` folders behind when a build is killed and never removes them.
    # A young one may be another process's build in progress: only those idle for an hour go.
    for stale in Path(folder).glob("incomplete.*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
