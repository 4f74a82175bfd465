"""Inpainting and repair: regenerate the masked pixels of an image, keep the rest.

RePaint (Lugmayr et al. 2022, Algorithm 1, with optional resampling) on the latents, then the known
pixels are pasted back; repair finds salt-and-pepper specks and thin scratches and inpaints them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.diffusion.denoiser import DenoiserFn
from latentdiff.errors import ConfigError, DataError
from latentdiff.pipeline.control import (
    bound_denoiser,
    check_images,
    decode_latents,
    encode_images,
    generator,
    grid,
    resolve,
)
from latentdiff.pipeline.request import SampleRequest


def check_mask(pipe, mask, n: int) -> np.ndarray:
    """bool N×H×W (True = regenerate) from an H×W or N×H×W array of 0/1 or bool."""
    mask = np.asarray(mask)
    h, w = pipe.image_shape[1:]
    if mask.ndim == 2:
        mask = np.broadcast_to(mask, (n, *mask.shape))
    if mask.shape != (n, h, w):
        raise DataError(f"the mask must be {h}×{w} like the images, got {'×'.join(map(str, mask.shape[-2:]))}")
    return mask.astype(bool)


def latent_mask(mask: np.ndarray, factor: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask N×H×W (True = regenerate) -> latent mask (N, 1, h, w) float.

    Any-pooling over each latent cell's f×f pixel block: a cell is regenerated if any of its pixels
    is, so that no part of the hole is kept from the (damaged) input's latent. The encoder's
    receptive field is wider than f×f; the paste-back in pixel space covers that remaining leak.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[:, None]  # (N, 1, H, W)
    h, w = latent_hw
    m = F.pad(m, (0, w * factor - m.shape[-1], 0, h * factor - m.shape[-2]))  # ceil-rounded latent: pad with "keep"
    return F.max_pool2d(m, factor)  # (N, 1, h, w)


@torch.no_grad()
def inpaint_latent(schedule, fn: DenoiserFn, z_known: torch.Tensor, m: torch.Tensor, ts: torch.Tensor, *,
                   resample: int = 0, generator=None, callback=None) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1) on latents; m = 1 where to generate.

    At every step the unknown part comes from the reverse step p(x_{t'} | x_t) (the strided DDPM
    posterior) and the known part from q(x_{t'} | x_0) of the known latent; with `resample` = r,
    each step is redone r more times after going back up by q(x_t | x_{t'}), which lets the
    generated part harmonise with the known part. `callback(i, n, x0_hat)` is called after every step.
    """
    if resample < 0:
        raise ConfigError(f"resample must be >= 0, got {resample}")

    def noise():
        return torch.randn(z_known.shape, generator=generator, device=z_known.device, dtype=z_known.dtype)

    def tt(t):
        return torch.full((len(z_known),), int(t), dtype=torch.long, device=z_known.device)

    x = m * noise() + (1 - m) * schedule.add_noise(z_known, noise(), tt(ts[0]))  # x_T; known part from q(x_T|x_0)
    for i, t in enumerate(ts.tolist()):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        for u in range(resample + 1):
            pred = fn(x, tt(t))
            mean, var = schedule.posterior(pred.x0, x, tt(t), tt(t_prev))
            unknown = mean + var.sqrt() * noise() if t_prev >= 0 else mean
            known = schedule.add_noise(z_known, noise(), tt(t_prev)) if t_prev >= 0 else z_known
            x = m * unknown + (1 - m) * known
            if u < resample and t_prev >= 0:  # back up one stride: q(x_t | x_{t'}) = N(sqrt(ᾱ_t/ᾱ_t') x, 1 - ᾱ_t/ᾱ_t')
                ratio = float(schedule.abar(t) / schedule.abar(t_prev))
                x = ratio**0.5 * x + (1 - ratio) ** 0.5 * noise()
        if callback:
            callback(i, len(ts), pred.x0)
    return x


def inpaint(pipe, images, mask, request: SampleRequest | None = None, *, resample: int = 0, paste_back: bool = True,
            callback=None, watermark=None, **fields) -> np.ndarray:
    """Regenerate the pixels where `mask` is true, keep the rest.

    `mask`: H×W or N×H×W, true/1 = regenerate. With `paste_back` the known pixels of the result
    are the input's bytes exactly; without it the result is the decoded latent, whose known part is
    the codec's reconstruction of the input. `watermark`: a key whose decoder mark the regenerated pixels carry
    (RePaint's fresh noise at every step leaves no room for the noise mark).
    """
    images = check_images(pipe, images)
    mask = check_mask(pipe, mask, len(images))
    z0 = encode_images(pipe, images)
    m = latent_mask(mask, pipe.autoencoder.cfg.factor, tuple(z0.shape[-2:])).to(z0.device, z0.dtype)
    req = resolve(pipe, request, len(z0), **fields)
    z = inpaint_latent(pipe.denoiser.schedule, bound_denoiser(pipe, req), z0, m, grid(pipe, req),
                       resample=int(resample), generator=generator(pipe, req.seed), callback=callback)
    out = decode_latents(pipe, z, watermark)
    if paste_back:
        out = np.where(mask[..., None], out, images)
    return out


def damage_mask(images, *, impulse_threshold: int = 50, scratch_threshold: int = 80, min_scratch_length: int = 6,
                max_scratch_width: float = 2.5) -> np.ndarray:
    """Guess which pixels are damaged, bool N×H×W, for uint8 images N×H×W×C.

    - salt and pepper: a pixel at 0 or 255 that differs from its 3×3 median by > impulse_threshold;
    - scratches: pixels differing from their 5×5 median by > scratch_threshold that form a connected
      (8-neighbour) run at least `min_scratch_length` long and on average at most `max_scratch_width`
      wide, i.e. thin bright or dark lines; genuine thin structures of the object can match too.
    The mask is dilated by one pixel, since damage fades into its neighbours.
    """
    from scipy import ndimage

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 N×H×W×C images, got {images.dtype} {images.shape}")
    out = np.zeros(images.shape[:3], dtype=bool)
    for n, img in enumerate(images):
        for c in range(img.shape[-1]):
            ch = img[..., c].astype(np.int16)
            med3 = ndimage.median_filter(ch, size=3, mode="reflect")
            impulse = ((ch == 0) | (ch == 255)) & (np.abs(ch - med3) > impulse_threshold)
            med5 = ndimage.median_filter(ch, size=5, mode="reflect")
            cand = np.abs(ch - med5) > scratch_threshold
            labels, k = ndimage.label(cand, structure=np.ones((3, 3)))
            scratch = np.zeros_like(cand)
            for i, sl in enumerate(ndimage.find_objects(labels), start=1):
                comp = labels[sl] == i
                length = max(comp.shape)  # bounding-box extent along the run
                if length >= min_scratch_length and comp.sum() / length <= max_scratch_width:
                    scratch[sl] |= comp
            out[n] |= impulse | scratch
    return ndimage.binary_dilation(out, structure=np.ones((1, 3, 3), dtype=bool))


def repair(pipe, images, mask=None, request: SampleRequest | None = None, *, resample: int = 2,
           **fields) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint the damaged pixels (`mask`, or :func:`damage_mask` when None); returns (images, mask used)."""
    images = check_images(pipe, images)
    mask = damage_mask(images) if mask is None else check_mask(pipe, mask, len(images))
    if not mask.any():
        return images.copy(), mask
    return inpaint(pipe, images, mask, request, resample=resample, **fields), mask
