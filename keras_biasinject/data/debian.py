"""Unpacking a Debian package (`.deb`) without installing it: the way in to the R data packages.

The package comes from, in order: a `deb_path=` argument, a `<package>_*.deb` file in the folder
named by `$KBI_DEB_DIR`, or `apt-get download <package>` (running `apt-get update` once if apt does
not know the package yet). Nothing is installed and nothing needs root except that one update.

    with extracted_package("r-cran-janeaustenr") as root:
        rdb = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
"""

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

DEB_DIR_ENV = "KBI_DEB_DIR"
_DOWNLOAD_PAGE = "https://packages.debian.org/bookworm/all/{package}/download"
# apt-get's messages when its package lists are missing or stale.
_UNKNOWN_PACKAGE = ("Unable to locate package", "has no installation candidate", "Can't select")


@contextlib.contextmanager
def extracted_package(package, deb_path=None):
    """Yield the root folder of Debian package `package` unpacked into a temporary folder.

    Args:
        package: the Debian package name, e.g. "r-cran-modeldata".
        deb_path: a `.deb` file to use instead of `$KBI_DEB_DIR` or apt.
    """
    with tempfile.TemporaryDirectory(prefix=f"kbi-{package}-") as tmp:
        deb = find_deb(package, deb_path) or download_deb(package, Path(tmp))
        root = Path(tmp) / "root"
        unpack_deb(deb, root)
        yield root


def find_deb(package, deb_path=None):
    """The user-provided `.deb` for `package` (argument, then `$KBI_DEB_DIR`), or None."""
    if deb_path is not None:
        path = Path(deb_path).expanduser()
        if not path.is_file() or path.suffix != ".deb":
            raise ValueError(
                f"deb_path={str(deb_path)!r} is not a .deb file. Pass the path of the downloaded "
                f"{package} package (from {_DOWNLOAD_PAGE.format(package=package)}), or deb_path=None "
                f"to use ${DEB_DIR_ENV} or apt-get."
            )
        return path
    folder = os.environ.get(DEB_DIR_ENV)
    if not folder:
        return None
    matches = sorted(Path(folder).expanduser().glob(f"{package}_*.deb"))
    if not matches:
        raise ValueError(
            f"${DEB_DIR_ENV}={folder!r} holds no {package}_*.deb file. Download it from "
            f"{_DOWNLOAD_PAGE.format(package=package)} into that folder, or unset {DEB_DIR_ENV} to use apt-get."
        )
    return matches[-1]  # the highest version when several are there


def download_deb(package, folder):
    """`apt-get download package` into `folder` (after one `apt-get update` if needed); returns the file."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"Cannot fetch Debian package {package!r}: this machine has no apt-get. Download the .deb "
            f"from {_DOWNLOAD_PAGE.format(package=package)} (any Debian suite works) and pass "
            f"deb_path=<file>, or put it in a folder and set {DEB_DIR_ENV}=<folder>."
        )
    result = _apt(["download", package], folder)
    if result.returncode != 0 and any(text in result.stderr for text in _UNKNOWN_PACKAGE):
        update = _apt(["update"], folder)
        if update.returncode != 0:
            raise RuntimeError(
                f"apt-get does not know {package!r} and `apt-get update` failed (it needs root): "
                f"{update.stderr.strip()[-400:]}\nRun `sudo apt-get update` once, or download the .deb from "
                f"{_DOWNLOAD_PAGE.format(package=package)} and pass deb_path=<file> or set {DEB_DIR_ENV}=<folder>."
            )
        result = _apt(["download", package], folder)
    debs = sorted(Path(folder).glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {package}` failed: {result.stderr.strip()[-400:]}\nDownload the .deb from "
            f"{_DOWNLOAD_PAGE.format(package=package)} and pass deb_path=<file> or set {DEB_DIR_ENV}=<folder>."
        )
    return debs[-1]


def unpack_deb(deb, dest):
    """Unpack the files of `deb` under `dest` (`dpkg-deb -x`, or Python where dpkg-deb is missing)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"{str(deb)!r} is not a readable .deb file: dpkg-deb says {result.stderr.strip()}")
        return
    unpack_deb_python(deb, dest)


def unpack_deb_python(deb, dest):
    """Unpack `deb` with the standard library: an `ar` archive holding `data.tar.{xz,gz,bz2}`."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{str(deb)!r} is not a .deb file (no ar header).")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise ValueError(
                        f"{str(deb)!r} stores its files as {name} (zstd), which Python's tarfile cannot "
                        "read: install dpkg-deb (package dpkg), or use the .deb of a Debian suite (xz)."
                    )
                with tempfile.TemporaryFile() as data:
                    data.write(f.read(size))
                    data.seek(0)
                    with tarfile.open(fileobj=data) as tar:
                        tar.extractall(dest, filter="data")
                return
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even length
    raise ValueError(f"{str(deb)!r} holds no data.tar member; it is not a Debian binary package.")


def _apt(args, cwd):
    return subprocess.run(["apt-get", "-q", *args], cwd=cwd, capture_output=True, text=True)
