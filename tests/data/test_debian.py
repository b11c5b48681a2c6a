import filecmp
import shutil
from pathlib import Path

import pytest

from keras_biasinject.data.debian import (
    DEB_DIR_ENV,
    download_deb,
    extracted_package,
    find_deb,
    unpack_deb,
    unpack_deb_python,
)

RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def test_download_names_the_package_file(debs):
    deb = debs["r-cran-janeaustenr"]
    assert deb.name.startswith("r-cran-janeaustenr_") and deb.suffix == ".deb"
    assert deb.stat().st_size > 1_000_000  # 1.6 MB in bookworm


def test_extracted_package_uses_apt_and_cleans_up(monkeypatch):
    monkeypatch.delenv(DEB_DIR_ENV, raising=False)
    with extracted_package("r-cran-janeaustenr") as root:
        assert (root / RDB).is_file()
        assert (root / RDB).with_suffix(".rdx").is_file()
    assert not root.exists()


def test_python_unpacker_matches_dpkg_deb(debs, tmp_path):
    unpack_deb(debs["r-cran-janeaustenr"], tmp_path / "dpkg")
    unpack_deb_python(debs["r-cran-janeaustenr"], tmp_path / "python")
    files = sorted(str(p.relative_to(tmp_path / "dpkg")) for p in (tmp_path / "dpkg").rglob("*") if p.is_file())
    assert RDB in files
    assert sorted(str(p.relative_to(tmp_path / "python")) for p in (tmp_path / "python").rglob("*") if p.is_file()) == files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "dpkg", tmp_path / "python", files, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_user_deb_path_and_folder(debs, tmp_path, monkeypatch):
    deb = debs["r-cran-modeldata"]
    monkeypatch.delenv(DEB_DIR_ENV, raising=False)
    assert find_deb("r-cran-modeldata") is None
    assert find_deb("r-cran-modeldata", deb_path=deb) == deb
    shutil.copy(deb, tmp_path / deb.name)
    monkeypatch.setenv(DEB_DIR_ENV, str(tmp_path))
    assert find_deb("r-cran-modeldata") == tmp_path / deb.name
    with extracted_package("r-cran-modeldata") as root:  # from the folder, not apt
        assert (root / "usr/lib/R/site-library/modeldata/data/Rdata.rdb").is_file()


def test_bad_user_inputs_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"deb_path='.*nope.deb' is not a .deb file.*packages.debian.org/bookworm/all/r-cran-modeldata"):
        find_deb("r-cran-modeldata", deb_path=tmp_path / "nope.deb")
    monkeypatch.setenv(DEB_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"\$KBI_DEB_DIR='.*' holds no r-cran-modeldata_\*.deb file"):
        find_deb("r-cran-modeldata")
    fake = tmp_path / "fake.deb"
    fake.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"fake.deb' is not a .deb file \(no ar header\)"):
        unpack_deb_python(fake, tmp_path / "out")
    with pytest.raises(ValueError, match=r"fake.deb' is not a readable .deb file: dpkg-deb says"):
        unpack_deb(fake, tmp_path / "out")


def test_without_apt_the_error_says_how_to_get_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no apt-get on PATH
    with pytest.raises(RuntimeError, match=r"this machine has no apt-get.*pass deb_path=<file>.*KBI_DEB_DIR=<folder>"):
        download_deb("r-cran-modeldata", tmp_path)


def test_unknown_package_error_names_it(tmp_path):
    # As root apt-get updates its lists and still fails; as a user the update itself fails.
    with pytest.raises(
        RuntimeError,
        match=r"(`apt-get download r-cran-no-such-package-kbi` failed: .*Unable to locate package"
        r"|apt-get does not know 'r-cran-no-such-package-kbi')",
    ):
        download_deb("r-cran-no-such-package-kbi", Path(tmp_path))
