"""Real data, fetched once per test session: the two Debian packages, unpacked, and both TFDS builds.

Everything goes under one session folder (`kbi_cache`), never the user's cache. The packages come
from `apt-get download` (about 1 s each); the builds take about 3 s each.
"""

from pathlib import Path

import pytest

from keras_biasinject.data import builders
from keras_biasinject.data.debian import download_deb, unpack_deb

PACKAGES = {"r-cran-modeldata": "modeldata", "r-cran-janeaustenr": "janeaustenr"}


@pytest.fixture(scope="session")
def kbi_cache(tmp_path_factory):
    """A session cache folder; tests that load by name point `$KBI_CACHE` at it with monkeypatch."""
    return tmp_path_factory.mktemp("kbi_cache")


@pytest.fixture(scope="session")
def debs(tmp_path_factory):
    """{package: .deb path}, downloaded with apt-get once."""
    folder = tmp_path_factory.mktemp("debs")
    return {package: download_deb(package, folder) for package in PACKAGES}


@pytest.fixture(scope="session")
def rdata_prefix(debs, tmp_path_factory):
    """{R package name: path of its `data/Rdata` lazy-load database}, unpacked with dpkg-deb."""
    prefixes = {}
    for package, r_name in PACKAGES.items():
        root = tmp_path_factory.mktemp(package)
        unpack_deb(debs[package], root)
        prefixes[r_name] = root / builders.R_LIBRARY / r_name / "data" / "Rdata"
    return prefixes


@pytest.fixture(scope="session")
def built(debs, kbi_cache):
    """{name: prepared builder} for both data sets, built under `kbi_cache/tfds`."""
    deb_of = {"small_fine_foods": debs["r-cran-modeldata"], "jane_austen": debs["r-cran-janeaustenr"]}
    return {
        name: builders.prepared_builder(name, data_dir=Path(kbi_cache) / "tfds", deb_path=deb_of[name])
        for name in builders.BUILDERS
    }
