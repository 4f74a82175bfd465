"""Data sets by name: the bundled Fashion-MNIST subset, the full Fashion-MNIST IDX files, folders.

Everything is returned as :class:`ImageData` holding uint8 ``N×H×W×C`` arrays (or, for the latent cache, as
a Dataset of items by :func:`item_dataset`, which streams captioned folders);
:func:`latentdiff.utils.images.to_tensor` and ``to_uint8`` convert to and from the float
``N×C×H×W`` tensors in ``[-1, 1]`` that the models use. Every problem with the data itself raises
:class:`~latentdiff.errors.DataError` with a message that names the offending file and says what to do.
"""

from __future__ import annotations

import functools
import os
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from latentdiff.data.captioned import CaptionedImages, captioned_root, load_captioned
from latentdiff.data.emoji import load_emoji
from latentdiff.data.fashion_mnist import CLASS_NAMES, find_fashion_mnist, load_fashion_mnist
from latentdiff.data.folders import load_image_folder
from latentdiff.data.image_data import ImageData
from latentdiff.data.limits import check_image_size, check_loaded_bytes
from latentdiff.errors import DataError

SOURCES = ("bundled", "fashion-mnist", "emoji", "spoken-digits")  # plus: a path to a folder of images or WAV files


SPLITS = ("train", "test", "heldout")  # "heldout" is the emoji set's name for its test split


BUNDLED_NPZ = "fashion_mnist_subset.npz"


BUNDLED_SIZES = {"train": 10_000, "test": 2_000}


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


def _resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize N×H×W×C uint8 images to size×size with PIL bilinear, into one preallocated array."""
    mode = "L" if images.shape[3] == 1 else "RGB"
    out = np.empty((len(images), size, size, images.shape[3]), np.uint8)  # N×size×size×C
    for i, img in enumerate(images):
        resized = Image.fromarray(img.squeeze(2) if mode == "L" else img, mode).resize(
            (size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized).reshape(size, size, images.shape[3])
    return out


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
    check_image_size(image_size)
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")


def _load_fashion(source: str, split: str, data_dir, image_size: int | None, channels: int | None,
                  limit: int | None) -> ImageData:
    if source == "bundled":
        arrays = _bundled_arrays()
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        description = f"bundled Fashion-MNIST subset ({split})"
    else:
        images, labels = load_fashion_mnist(find_fashion_mnist(data_dir), split)
        description = f"Fashion-MNIST ({split}, IDX files)"  # no local path: it ends up in model cards
    n, h, w = images[:limit].shape
    size_h, size_w = (image_size, image_size) if image_size is not None else (h, w)
    check_loaded_bytes(n, size_h, size_w, channels or 1, description)  # before resizing anything
    images = np.array(images[:limit, :, :, None])  # N×H×W×1, a copy: the cache stays read-only
    labels = np.array(labels[:limit])
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        images = _resize_array(images, image_size)
    images = _set_channels(images, channels or images.shape[3])
    return ImageData(images, labels, len(CLASS_NAMES), CLASS_NAMES, description)


def _load_emoji(split: str, data_dir, image_size: int | None, channels: int | None,
                limit: int | None) -> ImageData:
    """The emoji set (full when downloaded, else the bundled subset); labels are its categories."""
    emoji = load_emoji("heldout" if split == "test" else split, data_dir, image_size or 64)
    if limit is not None:
        emoji = emoji.select(np.arange(len(emoji)) < limit)
    check_loaded_bytes(len(emoji), emoji.images.shape[1], emoji.images.shape[2], channels or 3, emoji.source)
    data = emoji.to_image_data()
    data.images = _set_channels(data.images, channels or 3)
    return data


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
    found by :func:`find_fashion_mnist`), ``"emoji"`` (64×64 RGB emoji with captions and category
    labels; ``split`` "test" or "heldout" is the held-out emoji; the bundled subset when the full set is
    not downloaded; ``data_dir`` names its folder), or a path to a folder of images (``split`` picks the
    ``train/`` or ``test/`` subfolder when both exist, and is ignored otherwise). ``image_size``
    resizes, ``channels`` converts (1 gray, 3 RGB), ``limit`` keeps the first N images.
    """
    _check_args(split, image_size, channels, limit)
    if source == "emoji":
        return _load_emoji(split, data_dir, image_size, channels, limit)
    if split == "heldout":
        raise DataError(f"split 'heldout' is the emoji set's; {source!r} has train and test")
    if source == "spoken-digits":  # audio as log-mel images (data/audio_data.py)
        from latentdiff.data.audio_data import load_spoken_digits
        return load_spoken_digits(split, data_dir, limit)
    if source in SOURCES:
        return _load_fashion(source, split, data_dir, image_size, channels, limit)

    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"unknown data source {source!r}: expected {', '.join(SOURCES)} or a path "
                        "to a folder of images (no such folder)")
    if not root.is_dir():
        raise DataError(f"data source {root} is a file; expected {', '.join(SOURCES)} "
                        "or a folder of images")
    from latentdiff.data.audio_data import is_wav_folder, load_wav_folder
    if (root / split).is_dir() and is_wav_folder(root / split):
        return load_wav_folder(root / split, limit)
    if is_wav_folder(root):
        return load_wav_folder(root, limit)
    captioned = captioned_root(root, split)
    if captioned is not None:
        return load_captioned(captioned, image_size, channels, limit)
    options = {"image_size": image_size, "channels": channels, "limit": limit}
    if (root / "train").is_dir() and (root / "test").is_dir():
        data = load_image_folder(root / split, **options)
        data.source = f"image folder {root} ({split})"
        return data
    return load_image_folder(root, **options)


class ImageItems(Dataset):
    """Items ``{"image": float C×H×W in [-1, 1], "text": caption or "", "index": i}`` of in-memory ImageData."""

    def __init__(self, data: ImageData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def info(self):
        return self.data.info

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.data.images[i].copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {"image": x, "text": self.data.captions[i] if self.data.captions else "", "index": i}


def item_dataset(source: str, split: str = "train", *, data_dir=None, image_size: int | None = None,
                 channels: int | None = None, limit: int | None = None) -> Dataset:
    """The items ``{"image", "text", "index"}`` of a data source, for the latent cache. A captioned folder
    streams (one image decoded per item, so it may be larger than memory); other sources are loaded with
    :func:`load_dataset` first."""
    _check_args(split, image_size, channels, limit)
    if source not in SOURCES and Path(source).expanduser().is_dir():
        root = captioned_root(source, split)
        if root is not None:
            return CaptionedImages(root, image_size, limit=limit, channels=channels or 3)
    return ImageItems(load_dataset(source, split, data_dir=data_dir, image_size=image_size, channels=channels,
                                   limit=limit))
