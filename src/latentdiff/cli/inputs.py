"""Input files of the control commands: images converted to the model's shape, masks, rectangles.

Inputs are image files (any size with the model's aspect ratio; colour is converted to the
model's channels), masks are image files of the input's size (white = regenerate) or a rectangle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from latentdiff.cli.options import one_line
from latentdiff.errors import ConfigError, DataError


def _warn(message: str):
    sys.stderr.write(f"latentdiff: warning: {one_line(message)}\n")


def load_image(path: str | Path, pipe) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file -> (uint8 1×H×W×C in the model's shape, the file's own (width, height)).

    Colour mode is converted to the model's channels (RGB -> L by ITU-R 601 luma, L -> RGB by
    repetition, alpha dropped). A different size is resized only if the aspect ratio is the same.
    """
    from PIL import Image

    from latentdiff.data import as_mode, open_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if pipe.cfg.modality == "audio":
        return load_sound(path, pipe)
    c, h, w = pipe.image_shape
    im = as_mode(open_image(path), c)
    size = im.size
    if size != (w, h):
        if size[0] * h != size[1] * w:
            raise DataError(f"{path} is {size[0]}×{size[1]} but the model works on {w}×{h} images; the aspect "
                            f"ratio differs, so crop it to {w}:{h} first")
        _warn(f"resized {path.name} from {size[0]}×{size[1]} to {w}×{h}")
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8).reshape(1, h, w, c), size  # a writable copy for torch


def load_sound(path: Path, pipe) -> tuple[np.ndarray, tuple[int, int]]:
    """A WAV file -> (its uint8 1×n_mels×frames×1 log-mel image, (frames, n_mels)) for an audio model: resampled
    to the model's rate, cut or zero-padded to one clip."""
    from latentdiff.codecs.mel import waves_to_uint8
    from latentdiff.data.audio_data import fit_clip
    from latentdiff.utils.audio import read_wav

    if path.suffix.lower() != ".wav":
        raise DataError(f"{path}: an audio model takes .wav inputs")
    wave, rate, _ = read_wav(path)
    image = waves_to_uint8(fit_clip(wave, rate, pipe.cfg.mel)[None], pipe.cfg.mel)  # 1×M×N×1
    return image, (image.shape[2], image.shape[1])


def span_mask(span: tuple[float, float], pipe) -> np.ndarray:
    """START,END seconds -> bool n_mels×frames mask of the STFT frames whose centres fall in the span."""
    mel = pipe.cfg.mel
    start, end = span
    length = mel.clip_samples / mel.sample_rate
    if not 0 <= start < end <= length:
        raise ConfigError(f"--span {start:g},{end:g} must satisfy 0 <= START < END <= {length:g} s")
    centres = np.arange(mel.frames) * mel.hop / mel.sample_rate  # frame t is centred at t·hop
    mask = np.zeros((mel.n_mels, mel.frames), dtype=bool)
    mask[:, (centres >= start) & (centres < end)] = True
    return mask


def load_mask(path: str | Path, image_size: tuple[int, int], model_hw: tuple[int, int]) -> np.ndarray:
    """A mask file of the input image's size (white, >= 128, = regenerate) -> bool H×W at the model's size.

    When the image was resized, the mask is box-filtered to the model's size and any coverage
    counts, so that resizing never shrinks the hole.
    """

    from latentdiff.data import as_mode, open_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file not found: {path}")
    im = as_mode(open_image(path), 1)
    if im.size != image_size:
        raise DataError(f"the mask {path} is {im.size[0]}×{im.size[1]} but the image is "
                        f"{image_size[0]}×{image_size[1]}; they must be the same size")
    return _resize_mask(np.asarray(im) >= 128, model_hw)


def rect_mask(rect: tuple[int, int, int, int], image_size: tuple[int, int], model_hw: tuple[int, int]) -> np.ndarray:
    """x0,y0,x1,y1 (x1, y1 exclusive) in the input image's pixels -> bool H×W at the model's size."""
    x0, y0, x1, y1 = rect
    w, h = image_size
    if x1 > w or y1 > h:
        raise ConfigError(f"--rect {x0},{y0},{x1},{y1} reaches outside the {w}×{h} image")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return _resize_mask(mask, model_hw)


def _resize_mask(mask: np.ndarray, model_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if mask.shape == tuple(model_hw):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(model_hw[::-1], Image.Resampling.BOX)
    return np.asarray(im) > 0




def load_model(opts):
    """The model of a sampling command: PyTorch on --device, or ONNX Runtime over an export (--runtime onnx)."""
    from latentdiff.errors import ConfigError
    from latentdiff.pipeline import LatentDiffusion, resolve_device

    if opts.runtime == "onnx":
        from latentdiff.export import load_onnx

        if opts.device not in (None, "auto", "cpu"):
            raise ConfigError("--runtime onnx runs on the CPU; use --device cpu (or leave it out)")
        return load_onnx(opts.model, threads=opts.threads)
    if opts.threads is not None:
        raise ConfigError("--threads applies to --runtime onnx only")
    return LatentDiffusion.load(opts.model, resolve_device(opts.device))
