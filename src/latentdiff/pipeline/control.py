"""Control: editing, inpainting, interpolation and mixing of images with a trained LatentDiffusion.

Every function takes uint8 images N×H×W×C (the format of ``LatentDiffusion.generate``), works on
normalised latents through the pipeline's codec, and returns uint8 images. Conditioning is bound
into a denoiser function (``guidance.py``) before any sampler runs, so samplers stay label-free.

- :func:`img2img` — SDEdit (Meng et al. 2022): noise the latent to t ≈ strength·T, denoise from there.
- :func:`inpaint` — replace the known latent region at every step (Lugmayr et al. 2022, RePaint,
  Algorithm 1, with optional resampling), then paste the known pixels back.
- :func:`invert`, :func:`interpolate_seeds`, :func:`interpolate_images` — deterministic DDIM
  inversion (Song et al. 2021; Mokady et al. 2023) and spherical interpolation of the noise.
- :func:`combine` — a weighted mix of latents, then SDEdit to bring it back onto the data manifold.
- :func:`class_arithmetic` — latent + mean(class A) - mean(class B), class means from the model's samples.
- :func:`damage_mask` / :func:`repair` — find salt-and-pepper noise and thin scratches, inpaint them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.diffusion.denoiser import DenoiserFn
from latentdiff.diffusion.schedule import timesteps
from latentdiff.errors import ConfigError, DataError
from latentdiff.guidance.cfg import blend, classifier_free
from latentdiff.sampling.samplers import SAMPLERS, ddim, ddim_invert
from latentdiff.utils.images import to_tensor, to_uint8

# --- small helpers ------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between a and b (Shoemake 1985), one vector per sample of the batch.

    a, b: (B, ...); t: a number or a (B,) tensor. For vectors of equal norm the result keeps that
    norm; t = 0 gives a and t = 1 gives b exactly. Where a and b are (anti)parallel within `eps`
    the arc is undefined or ill-conditioned and plain linear interpolation is used instead.
    """
    if a.shape != b.shape:
        raise ConfigError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.flatten(1).double(), b.flatten(1).double()  # (B, D)
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).expand(a.shape[0])  # (B,)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-300)
    theta = cos.clamp(-1, 1).arccos()
    near = (1 - cos.abs()) < eps
    sin = torch.where(near, torch.ones_like(theta), theta.sin())
    wa = torch.where(near, 1 - t, ((1 - t) * theta).sin() / sin)
    wb = torch.where(near, t, (t * theta).sin() / sin)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)


def _generator(pipe, seed: int) -> torch.Generator:
    return torch.Generator(device=pipe.device).manual_seed(int(seed))


def _check_images(pipe, images) -> np.ndarray:
    """uint8 N×H×W×C (or N×H×W for one channel) matching the model's image shape."""
    images = np.asarray(images)
    if images.ndim == 3 and pipe.image_shape[0] == 1:
        images = images[..., None]
    c, h, w = pipe.image_shape
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise DataError(f"expected uint8 images of shape N×{h}×{w}×{c} for this model, "
                        f"got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise DataError("no images given")
    return images


def encode(pipe, images) -> torch.Tensor:
    """uint8 images -> normalised latents z0 (posterior means), (N, c, h, w)."""
    x = to_tensor(_check_images(pipe, images)).to(pipe.device)  # N×C×H×W in [-1, 1]
    with torch.no_grad():
        return pipe.autoencoder.to_latent(x)


def decode(pipe, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(pipe.autoencoder.from_latent(z))


def reconstruct(pipe, images) -> np.ndarray:
    """What the codec alone makes of the images: the best any latent edit can reproduce."""
    return decode(pipe, encode(pipe, images))


def _labels(pipe, labels, n: int) -> torch.Tensor | None:
    labels = pipe.check_labels(labels)
    if labels is None:
        return None
    if labels.ndim == 0:
        labels = labels.expand(n)
    if len(labels) != n:
        raise ConfigError(f"got {len(labels)} labels for {n} images")
    return labels.to(pipe.device)


def denoiser_fn(pipe, labels, n: int, guidance: float | None = None) -> DenoiserFn:
    """The model's denoiser with labels bound (classifier-free guided when labels are given)."""
    guidance = pipe.cfg.sample.guidance if guidance is None else float(guidance)
    if not guidance >= 0:
        raise ConfigError(f"guidance must be >= 0, got {guidance}")
    labels = _labels(pipe, labels, n)
    if labels is None:
        return pipe.denoiser.bind(None)
    return classifier_free(pipe.denoiser, labels, guidance)


def _steps(pipe, steps: int | None) -> int:
    steps = steps or pipe.cfg.sample.steps
    T = pipe.denoiser.schedule.num_steps
    if not 1 <= steps <= T:
        raise ConfigError(f"steps must be between 1 and {T}, got {steps}")
    return int(steps)


def _check_strength(strength: float):
    if not (0 < strength <= 1):
        raise ConfigError(f"strength must be in (0, 1], got {strength}")


# --- SDEdit ---------------------------------------------------------------------------------------


def sdedit_latent(pipe, z0: torch.Tensor, strength: float, fn: DenoiserFn, *, steps: int | None = None,
                  sampler: str | None = None, generator=None, eta: float = 0.0) -> torch.Tensor:
    """SDEdit in latent space (Meng et al. 2022, §4): z_t = add_noise(z0, ε, t), then sample t -> 0.

    The sampler runs over the part of the usual `steps`-step grid that lies below strength·T, so
    strength 1 is plain generation (the input survives only through sqrt(ᾱ_{T-1}), zero with a
    zero-terminal-SNR schedule), and a strength below the lowest grid step changes nothing.
    """
    _check_strength(strength)
    schedule = pipe.denoiser.schedule
    sampler = sampler or pipe.cfg.sample.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    ts = timesteps(schedule.num_steps, _steps(pipe, steps)).to(z0.device)
    ts = ts[ts < strength * schedule.num_steps]
    if len(ts) == 0:
        return z0
    eps = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    zt = schedule.add_noise(z0, eps, ts[:1].expand(len(z0)))
    options = {"eta": eta} if sampler == "ddim" else {}
    return SAMPLERS[sampler](fn, zt, schedule, ts, generator=generator, **options)


def img2img(pipe, images, strength: float, *, label=None, guidance: float | None = None, steps: int | None = None,
            seed: int = 0, sampler: str | None = None) -> np.ndarray:
    """Edit images by SDEdit: keep their layout, re-imagine the details (more with higher strength)."""
    z0 = encode(pipe, images)
    fn = denoiser_fn(pipe, label, len(z0), guidance)
    return decode(pipe, sdedit_latent(pipe, z0, strength, fn, steps=steps, sampler=sampler,
                                      generator=_generator(pipe, seed)))


def combine(pipe, images, weights, strength: float = 0.5, *, label=None, guidance: float | None = None,
            steps: int | None = None, seed: int = 0) -> np.ndarray:
    """One image from several: z = Σ w_i z_i (weights normalised to sum 1), then SDEdit at `strength`.

    A linear mix of latents is blurry and off the data manifold (it has less variance than a real
    latent); the partial denoising pulls it back. Returns one image, (1, H, W, C).
    """
    z = encode(pipe, images)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(z):
        raise ConfigError(f"need one weight per image: {len(z)} images, {w.size} weights")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ConfigError(f"weights must be positive finite numbers, got {', '.join(f'{v:g}' for v in w)}")
    w = torch.as_tensor(w / w.sum(), dtype=z.dtype, device=z.device)
    mix = (w.reshape(-1, 1, 1, 1) * z).sum(0, keepdim=True)  # (1, c, h, w)
    fn = denoiser_fn(pipe, label, 1, guidance)
    return decode(pipe, sdedit_latent(pipe, mix, strength, fn, steps=steps, generator=_generator(pipe, seed)))


# --- DDIM inversion and interpolation --------------------------------------------------------------


def invert(pipe, images, *, steps: int | None = None, label=None, guidance: float = 1.0) -> torch.Tensor:
    """Images -> the noise z_T that deterministic DDIM (η = 0) over the same grid maps back to them.

    Encodes with the posterior mean, then runs DDIM forwards (``samplers.ddim_invert``). Guidance
    above 1 makes the inversion inexact (Mokady et al. 2023), hence the default of 1.
    """
    z0 = encode(pipe, images)
    fn = denoiser_fn(pipe, label, len(z0), guidance)
    ts = timesteps(pipe.denoiser.schedule.num_steps, _steps(pipe, steps)).to(z0.device)
    return ddim_invert(fn, z0, pipe.denoiser.schedule, ts)


def regenerate(pipe, noise: torch.Tensor, fn: DenoiserFn, steps: int | None = None) -> np.ndarray:
    """Deterministic DDIM (η = 0) from `noise` to images."""
    ts = timesteps(pipe.denoiser.schedule.num_steps, _steps(pipe, steps)).to(noise.device)
    return decode(pipe, ddim(fn, noise, pipe.denoiser.schedule, ts))


def _frame_weights(frames: int, device) -> torch.Tensor:
    if int(frames) != frames or frames < 2:
        raise ConfigError(f"frames must be an integer >= 2, got {frames}")
    return torch.linspace(0, 1, int(frames), dtype=torch.float64, device=device)


def _pair_labels(pipe, label, frames: int):
    """A label for both ends, or (label_a, label_b): -> per-frame denoiser inputs (or None)."""
    if label is None:
        return None
    a, b = (label, label) if np.ndim(label) == 0 else tuple(label)
    return _labels(pipe, a, frames), _labels(pipe, b, frames)


def interpolate_noise(pipe, noise_a: torch.Tensor, noise_b: torch.Tensor, frames: int, *, label=None,
                      guidance: float = 1.0, steps: int | None = None) -> np.ndarray:
    """Slerp between two starting noises (1, c, h, w), blend the two conditionings, regenerate with DDIM."""
    w = _frame_weights(frames, noise_a.device)  # (frames,)
    noise = slerp(noise_a.expand(len(w), -1, -1, -1), noise_b.expand(len(w), -1, -1, -1), w)
    pair = _pair_labels(pipe, label, len(w))
    if pair is None:
        fn = denoiser_fn(pipe, None, len(w), guidance)
    else:
        fa, fb = (denoiser_fn(pipe, lab, len(w), guidance) for lab in pair)
        fn = fa if torch.equal(pair[0], pair[1]) else blend(fa, fb, w.float())
    return regenerate(pipe, noise, fn, steps)


def seed_noise(pipe, seed: int) -> torch.Tensor:
    """The starting noise `generate(1, seed=seed)` uses, (1, c, h, w)."""
    return torch.randn((1, *pipe.autoencoder.latent_shape), generator=_generator(pipe, seed), device=pipe.device)


def interpolate_seeds(pipe, seed_a: int, seed_b: int, frames: int, *, label=None, guidance: float | None = None,
                      steps: int | None = None) -> np.ndarray:
    """Frames between the DDIM samples of two seeds (the ends equal ``generate(1, seed=..., sampler='ddim')``)."""
    guidance = pipe.cfg.sample.guidance if guidance is None else guidance
    return interpolate_noise(pipe, seed_noise(pipe, seed_a), seed_noise(pipe, seed_b), frames, label=label,
                             guidance=guidance, steps=steps)


def interpolate_images(pipe, img_a, img_b, frames: int, *, label=None, steps: int | None = None) -> np.ndarray:
    """Frames between two images: DDIM-invert both, slerp the noises, regenerate (ends ≈ reconstructions)."""
    pair = (None, None) if label is None else ((label, label) if np.ndim(label) == 0 else tuple(label))
    na = invert(pipe, img_a, steps=steps, label=pair[0])
    nb = invert(pipe, img_b, steps=steps, label=pair[1])
    if len(na) != 1 or len(nb) != 1:
        raise DataError("interpolate_images takes one image at each end")
    return interpolate_noise(pipe, na, nb, frames, label=label, guidance=1.0, steps=steps)


@torch.no_grad()
def class_means(pipe, n_per_class: int = 64, *, steps: int | None = None, seed: int = 0) -> torch.Tensor:
    """Mean clean latent of each class, (K, c, h, w), estimated from the model's own DDIM samples.

    The model's samples, not training data, so that this needs nothing but the model directory;
    with guidance 1 they follow the model's class-conditional distribution.
    """
    if pipe.num_classes == 0:
        raise ConfigError("class arithmetic needs a class-conditional model")
    g = _generator(pipe, seed)
    ts = timesteps(pipe.denoiser.schedule.num_steps, _steps(pipe, steps)).to(pipe.device)
    means = []
    for k in range(pipe.num_classes):
        noise = torch.randn((n_per_class, *pipe.autoencoder.latent_shape), generator=g, device=pipe.device)
        fn = denoiser_fn(pipe, k, n_per_class, 1.0)
        means.append(ddim(fn, noise, pipe.denoiser.schedule, ts).mean(0))
    return torch.stack(means)


def class_arithmetic(pipe, images, add_class: int, sub_class: int, *, amount: float = 1.0, strength: float = 0.0,
                     means: torch.Tensor | None = None, steps: int | None = None, seed: int = 0) -> np.ndarray:
    """z' = z + amount · (mean_{add_class} - mean_{sub_class}), decoded (after SDEdit if strength > 0).

    Honest caveat: class means of a small latent space blur shape differences, so the raw result
    is a blend ("a shirt drifting towards a dress"); strength 0.3-0.5 denoises it into a clean
    image of the added class, at the cost of the input's details.
    """
    if not 0 <= strength <= 1:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    means = class_means(pipe, steps=steps, seed=seed) if means is None else means
    for k in (add_class, sub_class):
        if not 0 <= k < len(means):
            raise ConfigError(f"class must be between 0 and {len(means) - 1}, got {k}")
    z = encode(pipe, images) + amount * (means[add_class] - means[sub_class])
    if strength > 0:
        fn = denoiser_fn(pipe, add_class, len(z), None)
        z = sdedit_latent(pipe, z, strength, fn, steps=steps, generator=_generator(pipe, seed))
    return decode(pipe, z)


# --- inpainting -------------------------------------------------------------------------------------


def _check_mask(pipe, mask, n: int) -> np.ndarray:
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
                   resample: int = 0, generator=None) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1) on latents; m = 1 where to generate.

    At every step the unknown part comes from the reverse step p(x_{t'} | x_t) (the strided DDPM
    posterior) and the known part from q(x_{t'} | x_0) of the known latent; with `resample` = r,
    each step is redone r more times after going back up by q(x_t | x_{t'}), which lets the
    generated part harmonise with the known part.
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
    return x


def inpaint(pipe, images, mask, *, steps: int | None = None, resample: int = 0, seed: int = 0, label=None,
            guidance: float | None = None, paste_back: bool = True) -> np.ndarray:
    """Regenerate the pixels where `mask` is true, keep the rest.

    `mask`: H×W or N×H×W, true/1 = regenerate. With `paste_back` the known pixels of the result
    are the input's bytes exactly; without it the result is the decoded latent, whose known part is
    the codec's reconstruction of the input.
    """
    images = _check_images(pipe, images)
    mask = _check_mask(pipe, mask, len(images))
    z0 = encode(pipe, images)
    m = latent_mask(mask, pipe.autoencoder.cfg.factor, tuple(z0.shape[-2:])).to(z0.device, z0.dtype)
    fn = denoiser_fn(pipe, label, len(z0), guidance)
    ts = timesteps(pipe.denoiser.schedule.num_steps, _steps(pipe, steps)).to(z0.device)
    z = inpaint_latent(pipe.denoiser.schedule, fn, z0, m, ts, resample=int(resample), generator=_generator(pipe, seed))
    out = decode(pipe, z)
    if paste_back:
        out = np.where(mask[..., None], out, images)
    return out


# --- repair -----------------------------------------------------------------------------------------


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


def repair(pipe, images, mask=None, *, steps: int | None = None, resample: int = 2, seed: int = 0, label=None,
           guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint the damaged pixels (`mask`, or :func:`damage_mask` when None); returns (images, mask used)."""
    images = _check_images(pipe, images)
    mask = damage_mask(images) if mask is None else _check_mask(pipe, mask, len(images))
    if not mask.any():
        return images.copy(), mask
    return inpaint(pipe, images, mask, steps=steps, resample=resample, seed=seed, label=label,
                   guidance=guidance), mask
