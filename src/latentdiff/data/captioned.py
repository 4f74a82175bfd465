"""Folders of captioned images (the Hugging Face ``imagefolder`` convention), streamed through a DataLoader.

A folder holds images (any size, any mode; alpha composited onto white) and a ``metadata.jsonl`` with one
JSON object per line: ``file_name`` (a path relative to the folder) and ``text`` (its caption); other keys
are kept as metadata. :class:`CaptionedImages` decodes one image per item, so a folder of any size streams
through :func:`caption_loader` with workers; each image passes the size and decompression-bomb limits of
:mod:`latentdiff.data.limits` (via :func:`~latentdiff.data.folders.open_image`) before it is decoded.
Under ``torchrun`` (or with an explicit ``rank``/``world_size``) the loader uses a DistributedSampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from latentdiff.data.folders import IMAGE_SUFFIXES, open_image, resize_crop
from latentdiff.data.image_data import DataInfo, ImageData
from latentdiff.data.limits import check_image_size, check_loaded_bytes
from latentdiff.errors import DataError

METADATA = "metadata.jsonl"


def read_captions(root: str | os.PathLike) -> list[dict]:
    """The records of ``root/metadata.jsonl``: each has ``file_name`` (checked: inside ``root``, an image
    that exists) and ``text``; a bad line raises DataError naming the file and line."""
    root = Path(root).expanduser()
    path = root / METADATA
    if not path.is_file():
        raise DataError(f"captioned folder {root} has no {METADATA} (one JSON object per line with "
                        "file_name and text)")
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) \
                    or not isinstance(record.get("text"), str):
                raise DataError(f"{path}, line {i}: needs a string file_name and a string text")
            name = record["file_name"]
            target = (root / name).resolve()
            if Path(name).is_absolute() or not target.is_relative_to(root.resolve()):
                raise DataError(f"{path}, line {i}: file_name {name!r} points outside the folder")
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES or not target.is_file():
                raise DataError(f"{path}, line {i}: {name!r} is not an existing .png/.jpg/.jpeg file")
            records.append(record)
    if not records:
        raise DataError(f"{path} lists no images")
    return records


def to_rgb_on_white(im: Image.Image) -> Image.Image:
    """Any Pillow image as RGB; transparency composited onto white."""
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if im.mode.startswith("I"):
        from latentdiff.data.folders import as_mode

        im = as_mode(im, 1)
    return im.convert("RGB")


class CaptionedImages(Dataset):
    """Item i: ``{"image": float C×S×S in [-1, 1], "text": str, "index": int}``, decoded on demand
    (C = ``channels``: 3 RGB, or 1 for the ITU-R 601 luma)."""

    def __init__(self, root: str | os.PathLike, image_size: int, *, limit: int | None = None, channels: int = 3):
        check_image_size(image_size)
        if image_size is None:
            raise DataError("a captioned folder needs an image size, as its images may differ in size: "
                            "pass --image-size N (data.image_size)")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root).expanduser()
        self.records = read_captions(self.root)[:limit]
        self.image_size, self.channels = int(image_size), channels

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r["text"] for r in self.records]

    @property
    def info(self) -> DataInfo:
        size = (self.image_size, self.image_size)
        return DataInfo(f"captioned folder {self.root}", size, self.channels, None, 0, (), tuple(self.captions), len(self))

    def image(self, i: int) -> np.ndarray:
        """Image i as uint8 S×S×C (centre square, resized)."""
        im = resize_crop(to_rgb_on_white(open_image(self.root / self.records[i]["file_name"])), self.image_size)
        return np.asarray(im if self.channels == 3 else im.convert("L"), dtype=np.uint8).reshape(
            self.image_size, self.image_size, self.channels)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.image(i).copy()).permute(2, 0, 1).float() / 127.5 - 1
        return {"image": x, "text": self.records[i]["text"], "index": i}


def captioned_root(source: str | os.PathLike, split: str = "train") -> Path | None:
    """The captioned folder a data source names, for a split: ``SOURCE/SPLIT`` when it has its own
    metadata.jsonl, else ``SOURCE`` itself when it has one; None when the source is not captioned."""
    root = Path(source).expanduser()
    if (root / split / METADATA).is_file():
        return root / split
    return root if (root / METADATA).is_file() else None


def load_captioned(root: Path, image_size: int | None, channels: int | None, limit: int | None) -> ImageData:
    """A captioned folder in memory: uint8 images with their captions (no class labels)."""
    data = CaptionedImages(root, image_size, limit=limit, channels=channels or 3)
    check_loaded_bytes(len(data), data.image_size, data.image_size, data.channels, f"captioned folder {root}")
    images = np.empty((len(data), data.image_size, data.image_size, data.channels), np.uint8)
    for i in range(len(data)):
        images[i] = data.image(i)
    return ImageData(images, None, 0, (), f"captioned folder {root}", captions=tuple(data.captions))


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed's when initialised, else torchrun's
    environment (RANK, WORLD_SIZE), else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
    return rank, world_size


def caption_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, num_workers: int = 0,
                   seed: int = 0, drop_last: bool = False, rank: int | None = None,
                   world_size: int | None = None) -> DataLoader:
    """A DataLoader over ``dataset``; with several processes (see :func:`dist_info`) each rank gets a
    disjoint 1/world_size of it through a DistributedSampler (call ``loader.sampler.set_epoch(e)`` to
    reshuffle)."""
    if batch_size < 1 or num_workers < 0:
        raise DataError(f"batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size} and {num_workers}")
    rank, world_size = dist_info(rank, world_size)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last, generator=gen,
                      persistent_workers=False, pin_memory=False)
