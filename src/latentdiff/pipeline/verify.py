"""`latentdiff verify`: is this image one of ours? C2PA status, watermark detection, provenance fields.

Verdicts: "tampered" (a C2PA manifest whose signature or hashes do not match: exit 3), "generated"
(a valid signature or a detected watermark: exit 0), "not detected" (exit 1). A PNG grid of samples is cut
back into its tiles (layout from the record, else guessed from the size) and each watermark layer is tested on
every tile; the best tile counts, with its p-value multiplied by the number of tiles, so the bound still holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.errors import DataError
from latentdiff.pipeline.decoder_mark import mark_detection, nets_for
from latentdiff.pipeline.provenance import read_c2pa, read_record
from latentdiff.pipeline.watermark import DEFAULT_P_VALUE, DETECT_STEPS, WatermarkKey, noise_estimate, pooled

GRID_PAD = 2  # utils.images.make_grid's default padding


def load_pixels(path: Path, channels: int | None = None) -> np.ndarray:
    """uint8 H×W×C pixels of an image file (the first frame of an animation, alpha dropped)."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            mode = "L" if channels == 1 else "RGB" if channels == 3 else ("L" if im.mode in ("L", "LA", "P", "1")
                                                                            else "RGB")
            arr = np.array(im.convert(mode))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def tiles(img: np.ndarray, tile_hw: tuple[int, int]) -> np.ndarray | None:
    """The model-sized tiles of `img`: the image itself, or the cells of a make_grid grid (pad 2, any
    integer nearest-neighbour scale), or None when the size fits neither."""
    h, w = tile_hw
    H, W = img.shape[:2]
    if (H, W) == (h, w):
        return img[None]
    for scale in (1, 2, 3, 4):
        for pad in (GRID_PAD, 0):
            ch, cw = (h + pad) * scale, (w + pad) * scale
            if (H - pad * scale) % ch or (W - pad * scale) % cw or H < ch or W < cw:
                continue
            rows, cols = (H - pad * scale) // ch, (W - pad * scale) // cw
            cells = [img[pad * scale + r * ch: pad * scale + r * ch + h * scale: scale,
                         pad * scale + c * cw: pad * scale + c * cw + w * scale: scale]
                     for r in range(rows) for c in range(cols)]
            # blank cells (a grid not filled to the end) are padding colour only: leave them out
            cells = [c for c in cells if c.min() != c.max() or c.min() != 255]
            return np.stack(cells) if cells else None
    return None


def detect_pooled(model, cells: np.ndarray, keys: list[WatermarkKey], steps: int = DETECT_STEPS) -> dict:
    """The best key's detection over `cells`, both layers: the noise mark (pooled over the tiles, ``watermark.py``)
    and, where nets ship for the image size, the decoder mark (``decoder_mark.py``). The p-value of a key is the
    smaller layer's times the number of layers, times the number of keys tried (Bonferroni: valid however the
    layers and keys depend on each other), so trying two layers and the development key never raises the
    false-positive rate. `score`, `agree` and `bits` are the noise mark's; `layers` holds each layer's own."""
    e = noise_estimate(model, cells, steps)
    nets = nets_for(model.image_shape)
    best = None
    for key in keys:
        det = pooled(e, key)
        layers = {"noise": {"score": round(det.score, 3), "agree": det.agree, "bits": det.bits, "p_value": det.p_value}}
        if nets is not None:
            layers["decoder"] = mark_detection(nets, cells, key)
        p = min(1.0, min(v["p_value"] for v in layers.values()) * len(layers) * len(keys))
        if best is None or p < best["p_value"]:
            best = {"key": key.label, "key_id": key.fingerprint, "score": round(det.score, 3), "agree": det.agree,
                    "bits": det.bits, "p_value": p, "tiles": len(cells), "layers": layers}
    return best


def verify_file(path: str | Path, find_model: Callable[[dict | None, tuple], object | None],
                keys: list[WatermarkKey], alpha: float = DEFAULT_P_VALUE) -> dict:
    """The report for one file; `find_model(record, image_shape)` gives the model for detection (or None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    c2pa = read_c2pa(path)
    c2pa_record = c2pa.pop("record", None)
    record = read_record(path) or c2pa_record  # the text chunk keeps JSON types exactly (CBOR turns int lists into bytes)
    report = {"file": str(path), "c2pa": c2pa, "record": record, "watermark": None}
    try:
        img = load_pixels(path)
    except DataError as e:
        if c2pa["status"] != "invalid":
            raise
        img, model = None, None  # a signed file broken beyond decoding: tampered, nothing more to test
        report["watermark"] = {"detected": False, "detail": str(e)}
    if img is None:
        pass
    elif (model := find_model(record, img.shape)) is None:
        report["watermark"] = {"detected": False, "detail": "no model with this image size to test the watermark"}
    else:
        c, h, w = model.image_shape
        cells = tiles(load_pixels(path, c), (h, w))
        if cells is None:
            report["watermark"] = {"detected": False,
                                   "detail": f"{img.shape[1]}×{img.shape[0]} is neither the model's {w}×{h} "
                                             "nor a grid of it"}
        else:
            det = detect_pooled(model, cells, keys)
            report["watermark"] = {"detected": det["p_value"] <= alpha, "threshold_p": alpha, **det}
    if c2pa["status"] == "invalid":
        report["verdict"] = "tampered"
    elif c2pa["status"] == "valid" or report["watermark"]["detected"]:
        report["verdict"] = "generated"
    else:
        report["verdict"] = "not detected"
    return report


EXIT = {"generated": 0, "not detected": 1, "tampered": 3}


def exit_code(reports: list[dict]) -> int:
    """3 if any file is tampered, else 1 if any shows nothing, else 0."""
    verdicts = {r["verdict"] for r in reports}
    return 3 if "tampered" in verdicts else 1 if "not detected" in verdicts else 0
