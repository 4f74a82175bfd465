"""Folders of image files: decoding untrusted images safely, and loading a folder as :class:`ImageData`.

Every image's size is checked from its header against :mod:`latentdiff.data.limits` before any
pixel is decoded, and the whole folder's loaded size is checked before the first image is decoded.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from latentdiff.data.image_data import ImageData
from latentdiff.data.limits import (
    MAX_IMAGE_PIXELS,
    check_data_image,
    check_image_header,
    check_image_size,
    check_loaded_bytes,
)
from latentdiff.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# Only these in-process decoders are used (never e.g. EPS, which runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


# What Pillow's decoders raise on bad bytes: truncation (OSError, EOFError), broken chunks
# (SyntaxError), bad fields (ValueError, struct.error, IndexError) and bad zlib streams.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


# File signatures of IMAGE_FORMATS: a file that starts like one but cannot be parsed is damaged,
# not "not an image".
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    mode: str


def _sniff(path: Path) -> str | None:
    """The image format a file's first bytes announce, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if re.match(rb"P[1-6]\s", head):
        return "PPM"
    return next((fmt for sig, fmt in _SIGNATURES.items() if head.startswith(sig)), None)


def _bomb_pixels(err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{found.group(1)} pixels" if found else "too many pixels"


def read_header(path: Path) -> ImageHeader:
    """Size and mode from an image's header (no pixel decoded), checked against the memory limits."""
    try:
        with warnings.catch_warnings():  # Pillow warns about sizes that check_image_header refuses anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                header = ImageHeader(*im.size, im.mode)
    except Image.DecompressionBombError as e:  # Pillow's own, higher limit: say ours
        raise DataError(f"image {path} declares {_bomb_pixels(e)}; latentdiff reads images with at most "
                        f"{MAX_IMAGE_PIXELS} pixels (8192×8192)") from None
    except Image.UnidentifiedImageError:
        fmt = _sniff(path)
        if fmt is not None:
            raise DataError(f"cannot read image {path}: truncated or corrupt {fmt} file (its header cannot be "
                            "parsed); fix or remove the file") from None
        raise DataError(f"cannot read image {path}: not a {'/'.join(IMAGE_FORMATS)} image file") from None
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _DECODER_ERRORS as e:
        raise DataError(f"cannot read image {path}: truncated or corrupt ({type(e).__name__}: {e}); "
                        "fix or remove the file") from e
    check_image_header(path, header.width, header.height)
    return header


def open_image(path: Path) -> Image.Image:
    """Fully decode one image file after its header passed the size limits; any failure names the file."""
    path = Path(path)
    read_header(path)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.verify()  # PNG: checks chunk CRCs and completeness even if Pillow allows truncation
        im = Image.open(path, formats=IMAGE_FORMATS)
        im.load()
        return ImageOps.exif_transpose(im)
    except _DECODER_ERRORS as e:
        raise DataError(f"cannot read image {path}: truncated or corrupt ({type(e).__name__}: {e}); "
                        "fix or remove the file") from e


def is_gray(mode: str) -> bool:
    return mode in ("1", "L", "LA") or mode.startswith("I")


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


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """The centre square (side = the shorter side) resized to ``size×size``.

    Cropping first (Pillow's resize ``box``) means no intermediate image is ever larger than
    size×size, whatever the aspect ratio.
    """
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    if (w, h) == (size, size):
        return im
    return im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def image_files(root: Path) -> list[Path]:
    """Image files under ``root``, sorted; hidden files and folders (macOS ``._x.png``) skipped."""
    files = []
    for p in root.rglob("*"):
        hidden = any(s.startswith(".") for s in p.relative_to(root).parts)
        if p.suffix.lower() in IMAGE_SUFFIXES and not hidden and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _check_folder_size(root: Path, headers: list[ImageHeader], image_size: int | None, channels: int) -> None:
    """The loaded array's size from the headers alone, before any image is decoded."""
    if image_size is not None:
        check_loaded_bytes(len(headers), image_size, image_size, channels, f"image folder {root}")
    else:
        pixels = sum(h.width * h.height for h in headers)  # per-image sizes may still differ (refused later)
        check_loaded_bytes(1, 1, pixels, channels, f"image folder {root} ({len(headers)} images)")


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
    grayscale, else 3. Images of different sizes need ``image_size`` (centre square resized to
    N×N). Images are decoded one at a time, so memory holds one full-size image plus the result.
    """
    check_image_size(image_size)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    files = image_files(root)
    if not files:
        raise DataError(f"image folder {root} contains no .png/.jpg/.jpeg images")
    labeled = all(len(p.relative_to(root).parts) >= 2 for p in files)
    # Class names come from every file, so `limit` never changes the label mapping.
    class_names = tuple(sorted({p.relative_to(root).parts[0] for p in files})) if labeled else ()
    files = files[:limit]

    headers = [read_header(p) for p in files]
    for p, h in zip(files, headers):
        check_data_image(p, h.width, h.height, image_size)
    if channels is None:
        channels = 1 if all(is_gray(h.mode) for h in headers) else 3
    _check_folder_size(root, headers, image_size, channels)
    images, first = None, None
    for i, p in enumerate(files):
        im = as_mode(open_image(p), channels)
        if image_size is not None:
            im = resize_crop(im, image_size)
        elif first is None:
            first = (p, im.size)
        elif im.size != first[1]:
            raise DataError(
                f"images in {root} have different sizes: {first[0]} is {first[1][0]}×{first[1][1]} "
                f"but {p} is {im.size[0]}×{im.size[1]}; pass --image-size N (image_size=N) to "
                "resize and centre-crop them all to N×N"
            )
        if images is None:  # allocated once its shape is known: no list of arrays, no np.stack copy
            images = np.empty((len(files), im.size[1], im.size[0], channels), np.uint8)  # N×H×W×C
        images[i] = np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels)
    labels = None
    if labeled:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in files], dtype=np.int64)
    return ImageData(images, labels, len(class_names), class_names, f"image folder {root}")
