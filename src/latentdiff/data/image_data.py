"""The one container every data source returns: uint8 images with optional class labels and captions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latentdiff.errors import DataError


@dataclass
class DataInfo:
    """What training needs to know of a data set, without its pixels (which may stream from disk)."""

    source: str
    image_size: tuple[int, int]
    channels: int
    labels: np.ndarray | None
    num_classes: int
    class_names: tuple[str, ...]
    captions: tuple[str, ...] | None
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class ImageData:
    """A set of images (uint8 ``N×H×W×C``, C = 1 or 3) with optional integer class labels."""

    images: np.ndarray
    labels: np.ndarray | None  # int64 N, or None when the source has no labels
    num_classes: int  # 0 when unlabeled
    class_names: tuple[str, ...]  # () when unlabeled
    source: str  # human description, e.g. "bundled Fashion-MNIST subset (train)"
    captions: tuple[str, ...] | None = None  # one text per image (captioned sets), else None

    def __post_init__(self) -> None:
        x = self.images
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
            raise DataError(f"images must be uint8 N×H×W×C with C in (1, 3), got {x.dtype} {x.shape}")
        if self.labels is not None and self.labels.shape != (len(x),):
            raise DataError(f"labels shape {self.labels.shape} does not match {len(x)} images")
        if self.captions is not None and len(self.captions) != len(x):
            raise DataError(f"{len(self.captions)} captions for {len(x)} images")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.num_classes} classes but {len(self.class_names)} class names")

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def info(self) -> DataInfo:
        return DataInfo(self.source, self.image_size, self.channels, self.labels, self.num_classes, self.class_names,
                        self.captions, len(self))
