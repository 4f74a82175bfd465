"""Memory limits on loaded data, checked from file headers before anything is decoded or resized.

Image files and IDX files are untrusted input: a 65 KB PNG can declare 8192×8192 pixels and a
few-KB gzip file can inflate to gigabytes. Each limit below is documented in docs/reliability.md
("Memory limits"); a file beyond one is refused with one line that names it and the limit.
"""

from __future__ import annotations

from latentdiff.errors import DataError

# One decoded image file (any mode): bounds the decoder's own memory (256 MiB as RGBA).
MAX_IMAGE_PIXELS = 1 << 26  # 8192×8192

# Width/height (or height/width): beyond it a centre crop keeps under 1/16 of the picture.
MAX_ASPECT_RATIO = 16

# One image as loaded for training/evaluation (its own size, or --image-size²): the networks are
# built for small images, and a full-size photo would be trained at full size.
MAX_LOADED_PIXELS = 1 << 20  # 1024×1024

# The whole loaded N×H×W×C uint8 array (all images of a data set after resizing).
MAX_LOADED_BYTES = 1 << 32  # 4 GiB

# The payload an IDX file may declare (Fashion-MNIST's largest is 47 MB).
MAX_IDX_BYTES = 1 << 31  # 2 GiB


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB ({n} bytes)"


def check_image_size(image_size: int | None) -> None:
    """A requested --image-size must be positive and within MAX_LOADED_PIXELS."""
    if image_size is None:
        return
    if image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if image_size * image_size > MAX_LOADED_PIXELS:
        side = int(MAX_LOADED_PIXELS ** 0.5)
        raise DataError(f"--image-size {image_size} is beyond latentdiff's limit of {side}×{side} pixels per image")


def check_loaded_bytes(n: int, height: int, width: int, channels: int, what: str) -> None:
    """Refuse an N×H×W×C uint8 array larger than MAX_LOADED_BYTES, before it is allocated."""
    total = n * height * width * channels
    if total > MAX_LOADED_BYTES:
        raise DataError(f"{what}: {n} images of {height}×{width}×{channels} would take {_gib(total)} in memory, "
                        f"beyond latentdiff's limit of {_gib(MAX_LOADED_BYTES)}; use fewer images (--limit) "
                        "or a smaller --image-size, or for stage 2 a captioned folder (metadata.jsonl) with "
                        "--set data.latent_cache=auto, which streams it from disk")


def check_image_header(path, width: int, height: int) -> None:
    """Refuse one image file from its header size: too many pixels to decode."""
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image {path} is {width}×{height} pixels; latentdiff reads images with 1 to "
                        f"{MAX_IMAGE_PIXELS} pixels (8192×8192)")


def check_data_image(path, width: int, height: int, image_size: int | None) -> None:
    """Refuse a data-set image that is too elongated to crop, or too large to load at its own size."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"image {path} is {width}×{height} pixels, an aspect ratio beyond latentdiff's limit of "
                        f"{MAX_ASPECT_RATIO}:1; crop it first")
    if image_size is None and width * height > MAX_LOADED_PIXELS:
        side = int(MAX_LOADED_PIXELS ** 0.5)
        raise DataError(f"image {path} is {width}×{height} pixels, beyond latentdiff's limit of {side}×{side} "
                        "for images loaded at their own size; pass --image-size N (image_size=N) to resize them")
