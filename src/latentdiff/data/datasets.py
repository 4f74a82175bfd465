"""Image data sets: the bundled Fashion-MNIST subset, the full Fashion-MNIST IDX files, folders.

Everything is returned as :class:`ImageData` holding uint8 ``N×H×W×C`` arrays; :func:`to_tensor`
and :func:`to_uint8` convert to and from the float ``N×C×H×W`` tensors in ``[-1, 1]`` that the
models use. Every problem with the data itself raises :class:`~latentdiff.errors.DataError` with a
message that names the offending file and says what to do.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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


SOURCES = ("bundled", "fashion-mnist")  # plus: a path to a folder of images


SPLITS = ("train", "test")


BUNDLED_NPZ = "fashion_mnist_subset.npz"


BUNDLED_SIZES = {"train": 10_000, "test": 2_000}


_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions


_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# Image files are untrusted input: only these in-process decoders are used (never e.g. EPS, which runs
# Ghostscript), and an image larger than MAX_IMAGE_PIXELS is refused from its header, before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


MAX_IMAGE_PIXELS = 1 << 26  # 8192×8192


@dataclass
class ImageData:
    """A set of images (uint8 ``N×H×W×C``, C = 1 or 3) with optional integer class labels."""

    images: np.ndarray
    labels: np.ndarray | None  # int64 N, or None when the source has no labels
    num_classes: int  # 0 when unlabeled
    class_names: tuple[str, ...]  # () when unlabeled
    source: str  # human description, e.g. "bundled Fashion-MNIST subset (train)"

    def __post_init__(self) -> None:
        x = self.images
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
            raise ValueError(
                f"images must be uint8 N×H×W×C with C in (1, 3), got {x.dtype} {x.shape}"
            )
        if self.labels is not None and self.labels.shape != (len(x),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(x)} images")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but {len(self.class_names)} class names")

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (images 0x00000803 or labels 0x00000801), gzip or raw.

    Validates the magic number, the dimensions and the exact byte length.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == b"\x1f\x8b"  # sniff, so a misnamed file still reads
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as f:
            data = bytearray(f.read())  # bytearray: np.frombuffer then gives a writable array
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e}); download it again") from e
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e

    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{_IDX_IMAGES_MAGIC:08x} for "
            f"images or 0x{_IDX_LABELS_MAGIC:08x} for labels); not a Fashion-MNIST/MNIST IDX file"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: IDX header truncated: {len(data)} bytes, need {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: IDX dimensions {dims} contain a zero; the file holds no data")
    expected = header + int(np.prod(dims, dtype=object))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: wrong size for IDX dimensions {dims}: expected {expected} bytes, found "
            f"{len(data)} ({what}); download the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


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


def _load_fashion_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (_locate(directory, name) for name in FASHION_MNIST_SPLITS[split])
    assert images_path is not None and labels_path is not None  # find_fashion_mnist checked
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


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, target: Path, expected_md5: str, *, timeout: float, progress: bool) -> None:
    """Download ``url`` to a temporary file beside ``target``; rename it once the MD5 matches."""
    tmp: Path | None = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            fd, tmp_name = tempfile.mkstemp(".part", f".{target.name}.", target.parent)
            tmp = Path(tmp_name)
            h, done = hashlib.md5(usedforsecurity=False), 0
            with os.fdopen(fd, "wb") as f:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress and sys.stderr.isatty():
                        of = f" / {total / 1e6:.1f}" if total else ""
                        msg = f"\r  {target.name}: {done / 1e6:.1f}{of} MB"
                        print(msg, end="", file=sys.stderr)
                f.flush()
                os.fsync(f.fileno())
        if progress:
            print(f"\r  {target.name}: {done / 1e6:.1f} MB done", file=sys.stderr)
        actual = h.hexdigest()
        if actual != expected_md5:
            raise DataError(
                f"checksum mismatch for {target.name} downloaded from {url}: expected MD5 "
                f"{expected_md5}, got {actual}; the download was discarded, try again later"
            )
        os.replace(tmp, target)
        tmp = None
        fsync_dir(target.parent)
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"could not download {url}: {e.reason}; check the network") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, short reads, disk full
        raise DataError(f"could not download {url} to {target}: {e!r}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def download_fashion_mnist(
    dest: str | os.PathLike | None = None,
    *,
    base_url: str = OFFICIAL_URL,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download the four Fashion-MNIST .gz files to ``dest`` (default: cache_dir()/fashion-mnist).

    Files already present with the right MD5 are kept; each new file is written to a temporary
    file, checked against :data:`FASHION_MNIST_MD5`, fsynced and renamed into place.
    """
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / "fashion-mnist"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create download folder {dest}: {e}") from e
    for name, expected in FASHION_MNIST_MD5.items():
        target = dest / name
        if target.is_file() and _md5(target) == expected:
            if progress:
                print(f"  {name}: already present, checksum ok", file=sys.stderr)
            continue
        url = base_url.rstrip("/") + "/" + name
        if progress:
            print(f"downloading {url}", file=sys.stderr)
        _fetch(url, target, expected, timeout=timeout, progress=progress)
    return dest


@functools.lru_cache(maxsize=1)
def _bundled_arrays() -> dict[str, np.ndarray]:
    """The packaged subset, loaded once per process; read-only so no caller can alter the cache."""
    ref = resources.files("latentdiff") / "assets" / BUNDLED_NPZ
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"bundled data set {ref} is missing or corrupt ({e}); reinstall latentdiff "
                        "or regenerate it with scripts/make_bundled_subset.py") from e
    for split, n in BUNDLED_SIZES.items():
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if (images is None or labels is None or images.shape != (n, 28, 28)
                or images.dtype != np.uint8 or labels.shape != (n,)
                or labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise DataError(f"bundled data set {ref} has unexpected contents for split {split!r}; "
                            "reinstall latentdiff or regenerate it with "
                            "scripts/make_bundled_subset.py")
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def _is_gray(mode: str) -> bool:
    return mode in ("1", "L", "LA") or mode.startswith("I")


def open_image(path: Path) -> Image.Image:
    """Fully decode one image file; any failure names the file (never skipped silently)."""
    try:
        with warnings.catch_warnings():  # Pillow warns about sizes that the check below refuses anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=IMAGE_FORMATS)  # reads the header only
        with im:
            w, h = im.size
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"image {path} is {w}×{h} pixels; latentdiff reads images with 1 to "
                                f"{MAX_IMAGE_PIXELS} pixels")
            im.verify()  # PNG: checks chunk CRCs and completeness even if Pillow allows truncation
        im = Image.open(path, formats=IMAGE_FORMATS)
        im.load()
        return ImageOps.exif_transpose(im)
    except DataError:
        raise
    except Image.UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not a {'/'.join(IMAGE_FORMATS)} image file") from None
    # Decoders of untrusted bytes raise a zoo of types (OSError, SyntaxError, struct.error, ...).
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; "
                        "fix or remove the file") from e


def as_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert to 'L' (channels=1) or 'RGB' (channels=3); alpha is dropped."""
    if im.mode.startswith("I"):  # 16/32-bit gray: PIL's convert would clip, so rescale to 8 bits
        a = np.asarray(im).astype(np.int64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = (a.clip(0, 65535) + 128) // 257
        im = Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":  # via RGBA so palette transparency converts without a warning
        im = im.convert("RGBA")
    return im.convert("L" if channels == 1 else "RGB")


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, then centre-crop to ``size×size``."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root``, sorted; hidden files and folders (macOS ``._x.png``) skipped."""
    files = []
    for p in root.rglob("*"):
        hidden = any(s.startswith(".") for s in p.relative_to(root).parts)
        if p.suffix.lower() in _IMAGE_SUFFIXES and not hidden and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def load_image_folder(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> ImageData:
    """Load every *.png/*.jpg/*.jpeg under ``path`` (recursively, sorted).

    Labels come from first-level subfolder names when every image lies in one (class names
    sorted); otherwise the data is unlabeled. ``channels`` defaults to 1 when every image is
    grayscale, else 3. Images of different sizes need ``image_size`` (resize shorter side,
    centre-crop to a square).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files = _image_files(root)
    if not files:
        raise DataError(f"image folder {root} contains no .png/.jpg/.jpeg images")
    labeled = all(len(p.relative_to(root).parts) >= 2 for p in files)
    # Class names come from every file, so `limit` never changes the label mapping.
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in files})) if labeled else ()
    files = files[:limit]

    loaded = [open_image(p) for p in files]
    if channels is None:
        channels = 1 if all(_is_gray(im.mode) for im in loaded) else 3
    arrays, first = [], None
    for p, im in zip(files, loaded):
        im = as_mode(im, channels)
        if image_size is not None:
            im = _resize_crop(im, image_size)
        elif first is None:
            first = (p, im.size)
        elif im.size != first[1]:
            raise DataError(
                f"images in {root} have different sizes: {first[0]} is {first[1][0]}×{first[1][1]} "
                f"but {p} is {im.size[0]}×{im.size[1]}; pass --image-size N (image_size=N) to "
                "resize and centre-crop them all to N×N"
            )
        arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels))
    labels = None
    if labeled:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in files], dtype=np.int64)
    source = f"image folder {root}"
    return ImageData(np.stack(arrays), labels, len(class_names), class_names, source)


def _resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize N×H×W×C uint8 images to size×size with PIL bilinear."""
    mode = "L" if images.shape[3] == 1 else "RGB"
    out = [
        np.asarray(Image.fromarray(img.squeeze(2) if mode == "L" else img, mode)
                   .resize((size, size), Image.Resampling.BILINEAR))
        for img in images
    ]
    return np.stack(out).reshape(len(images), size, size, images.shape[3])


def _set_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[3] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    rgb = images.astype(np.uint32)  # ITU-R 601-2 luma with PIL's fixed-point rounding
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _check_args(split: str, image_size: int | None, channels: int | None,
                limit: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")


def load_dataset(
    source: str = "bundled",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> ImageData:
    """Load a data set as :class:`ImageData`.

    ``source``: ``"bundled"`` (the packaged 10k/2k subset), ``"fashion-mnist"`` (the full IDX files,
    found by :func:`find_fashion_mnist`), or a path to a folder of images (``split`` picks the
    ``train/`` or ``test/`` subfolder when both exist, and is ignored otherwise). ``image_size``
    resizes, ``channels`` converts (1 gray, 3 RGB), ``limit`` keeps the first N images.
    """
    _check_args(split, image_size, channels, limit)
    if source in SOURCES:
        if source == "bundled":
            arrays = _bundled_arrays()
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            description = f"bundled Fashion-MNIST subset ({split})"
        else:
            directory = find_fashion_mnist(data_dir)
            images, labels = _load_fashion_mnist(directory, split)
            description = f"Fashion-MNIST ({split}, IDX files)"  # no local path: it ends up in model cards
        images = np.array(images[:limit, :, :, None])  # N×H×W×1, a copy: the cache stays read-only
        labels = np.array(labels[:limit])
        if image_size is not None and images.shape[1:3] != (image_size, image_size):
            images = _resize_array(images, image_size)
        images = _set_channels(images, channels or images.shape[3])
        return ImageData(images, labels, len(CLASS_NAMES), CLASS_NAMES, description)

    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"unknown data source {source!r}: expected {', '.join(SOURCES)} or a path "
                        "to a folder of images (no such folder)")
    if not root.is_dir():
        raise DataError(f"data source {root} is a file; expected {', '.join(SOURCES)} "
                        "or a folder of images")
    options = dict(image_size=image_size, channels=channels, limit=limit)
    if (root / "train").is_dir() and (root / "test").is_dir():
        data = load_image_folder(root / split, **options)
        data.source = f"image folder {root} ({split})"
        return data
    return load_image_folder(root, **options)
