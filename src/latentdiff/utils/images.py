"""Images as arrays and files: [-1, 1] tensors <-> uint8 arrays, grids, PNGs with provenance text chunks,
sample archives (.npz) and folders of PNGs.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from latentdiff.errors import DataError
from latentdiff.utils.files import atomic_path, staged_dir


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 N×H×W×C -> one uint8 image (rows of `nrow` images with `pad` pixels between)."""
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def to_pil(img: np.ndarray) -> Image.Image:
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB")


def jpeg_roundtrip(images: np.ndarray, quality: int = 75) -> np.ndarray:
    """uint8 N×H×W×C images (C = 1 or 3) encoded as JPEG at `quality` by Pillow and decoded again."""
    out = []
    for img in images:
        buf = io.BytesIO()
        to_pil(img).save(buf, "JPEG", quality=int(quality))
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue()))).reshape(img.shape))
    return np.stack(out)


def save_png(img: np.ndarray, path: str | Path, metadata: dict | None = None, scale: int = 1):
    """Save one uint8 H×W[×C] image atomically; `metadata` goes into PNG text chunks (provenance)."""
    pil = to_pil(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)


def save_samples(images: np.ndarray, path: str | Path, labels: np.ndarray | None = None,
                 metadata: dict | None = None, nrow: int | None = None, scale: int = 2):
    """`.npz`: uint8 `images` (N×H×W grayscale, N×H×W×C colour) [+ `labels`]; `.png`: a grid."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        arr = images[..., 0] if images.shape[-1] == 1 else images
        extra = {"labels": labels.astype(np.int64)} if labels is not None else {}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=arr, **extra)
    elif path.suffix.lower() == ".png":
        save_png(make_grid(images, nrow), path, metadata, scale=scale)
    else:
        raise DataError(f"output {path} must end in .npz or .png")


def save_individual(images: np.ndarray, directory: str | Path, metadata: dict | None = None):
    """One PNG per image, 00000.png, 00001.png, ...: written as a set (``staged_dir``), all or none."""
    with staged_dir(directory) as stage:
        write_pngs(images, stage, metadata)


def write_pngs(images: np.ndarray, directory: Path, metadata: dict | None = None):
    for i, img in enumerate(images):
        save_png(img, directory / f"{i:05d}.png", metadata)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×C`` -> float32 ``N×C×H×W`` in [-1, 1] (x / 127.5 - 1)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 N×H×W×C images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # N×C×H×W
    return x.float().div_(127.5).sub_(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: float ``N×C×H×W`` (clamped to [-1, 1]) -> uint8 ``N×H×W×C``."""
    if x.ndim != 4:
        raise ValueError(f"expected an N×C×H×W tensor, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if torch.isnan(x).any():  # a NaN would become an arbitrary byte; make the upstream bug visible
        raise ValueError("tensor contains NaN; cannot convert it to an image")
    x = x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # N×H×W×C
