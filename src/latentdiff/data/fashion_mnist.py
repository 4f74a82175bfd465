"""Fashion-MNIST: class names, where the four IDX files are found, how they are downloaded and loaded."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

from latentdiff.data.idx import read_idx
from latentdiff.errors import DataError
from latentdiff.utils.files import fsync_dir

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# MD5 of the .gz files as published by Zalando Research. A module-level dict so tests can patch it.
# Debian's dataset-fashion-mnist rewrites the gzip header (drops the file name, changes the
# timestamp), so its files hash differently although the compressed data is byte-identical.
FASHION_MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


FASHION_MNIST_SPLITS: dict[str, tuple[str, str]] = {  # split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# Where `apt-get install dataset-fashion-mnist` puts the files (a system location, not a user's).
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


FASHION_MNIST_DIR_ENV = "LATENTDIFF_FASHION_MNIST_DIR"


CACHE_ENV = "LATENTDIFF_CACHE"


def _locate(directory: Path, name: str) -> Path | None:
    """The file ``name`` (.gz) in ``directory``, or its uncompressed twin, or None."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in FASHION_MNIST_MD5 if _locate(directory, name) is None]


def cache_dir() -> Path:
    """``$LATENTDIFF_CACHE``, else ``$XDG_CACHE_HOME/latentdiff``, else ``~/.cache/latentdiff``."""
    if os.environ.get(CACHE_ENV):  # an empty variable counts as unset, as XDG says
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "latentdiff"
    return Path.home() / ".cache" / "latentdiff"


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (each .gz or uncompressed).

    Search order: ``data_dir``; ``$LATENTDIFF_FASHION_MNIST_DIR``; the Debian package's folder;
    ``cache_dir()/fashion-mnist``. A folder named explicitly (argument or environment variable)
    must be complete: falling back elsewhere would hide the user's mistake.
    """
    explicit = [(Path(data_dir).expanduser(), "--data-dir")] if data_dir is not None else []
    if not explicit and os.environ.get(FASHION_MNIST_DIR_ENV):
        env_dir = Path(os.environ[FASHION_MNIST_DIR_ENV]).expanduser()
        explicit = [(env_dir, f"${FASHION_MNIST_DIR_ENV}")]
    for directory, how in explicit:
        if not directory.is_dir():
            raise DataError(f"Fashion-MNIST folder {directory} (from {how}) does not exist")
        missing = _missing(directory)
        if missing:
            raise DataError(
                f"Fashion-MNIST folder {directory} (from {how}) is missing {', '.join(missing)} "
                f"(.gz or uncompressed); run `latentdiff download fashion-mnist --dest {directory}`"
            )
        return directory

    searched = [SYSTEM_FASHION_MNIST_DIR, cache_dir() / "fashion-mnist"]
    partial = []
    for directory in searched:
        if directory.is_dir():
            missing = _missing(directory)
            if not missing:
                return directory
            partial.append(f"{directory} lacks {', '.join(missing)}")
    raise DataError(
        "Fashion-MNIST not found (searched "
        + ", ".join(str(d) for d in searched)
        + ("; " + "; ".join(partial) if partial else "")
        + "). Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
        "`latentdiff download fashion-mnist`, or point --data-dir (or "
        f"${FASHION_MNIST_DIR_ENV}) at a folder with {', '.join(FASHION_MNIST_MD5)}; "
        "or use the bundled subset (--data bundled)"
    )


def load_fashion_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×28×28 images and int64 N labels of one split from a folder :func:`find_fashion_mnist` accepted."""
    images_path, labels_path = (_locate(directory, name) for name in FASHION_MNIST_SPLITS[split])
    if images_path is None or labels_path is None:
        raise DataError(f"Fashion-MNIST folder {directory} lacks the {split} files {FASHION_MNIST_SPLITS[split]}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected IDX images (3 dims), found {images.ndim} dims")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected IDX labels (1 dim), found {labels.ndim} dims")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels")
    if labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{labels_path}: label {labels.max()} is not in 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def _download_error(url: str, target: Path, expected_md5: str, err: Exception) -> DataError:
    """One line for whatever pooch (or requests below it) raised; the wording names the cause first."""
    import requests

    if isinstance(err, ValueError):  # pooch's hash check: "... expected md5:X but got Y. Deleted download ..."
        got = re.search(r"but got ([0-9a-fA-F]+)", str(err))
        actual = got.group(1) if got else "something else"
        return DataError(f"checksum mismatch for {target.name} downloaded from {url}: expected MD5 "
                         f"{expected_md5}, got {actual}; the download was discarded, try again later")
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return DataError(f"could not download {url}: HTTP {err.response.status_code} {err.response.reason}")
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return DataError(f"could not download {url}: cannot connect ({type(err).__name__}); check the network")
    return DataError(f"could not download {url} to {target}: {type(err).__name__}: {err}")


def download_fashion_mnist(
    dest: str | os.PathLike | None = None,
    *,
    base_url: str = OFFICIAL_URL,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download the four Fashion-MNIST .gz files to ``dest`` (default: cache_dir()/fashion-mnist).

    pooch does the work: a file already present with the right MD5 is kept, a new or stale one is
    streamed to a temporary file beside the target, checked against :data:`FASHION_MNIST_MD5` and
    only then renamed into place, so an interrupted or corrupt download never leaves a file behind.
    """
    import pooch  # deferred: it imports requests, which `latentdiff --help` should not wait for
    import requests

    dest = Path(dest).expanduser() if dest is not None else cache_dir() / "fashion-mnist"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create download folder {dest}: {e}") from e
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # we print our own "downloading" line; pooch's repeats it with paths
    try:
        for name, expected in FASHION_MNIST_MD5.items():
            url = base_url.rstrip("/") + "/" + name
            if progress:
                print(f"downloading {url}" if not _md5_matches(dest / name, expected)
                      else f"  {name}: already present, checksum ok", file=sys.stderr)
            try:
                pooch.retrieve(url, known_hash=f"md5:{expected}", fname=name, path=dest, downloader=downloader)
            except (ValueError, OSError, requests.RequestException) as e:
                raise _download_error(url, dest / name, expected, e) from e
            fsync_dir(dest)
    finally:
        logger.setLevel(level)
    return dest


def _md5_matches(path: Path, expected: str) -> bool:
    import pooch

    return path.is_file() and pooch.file_hash(str(path), alg="md5") == expected
