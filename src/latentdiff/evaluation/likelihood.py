"""Likelihood of a LatentDiffusion model: the latent VLB, the LSGM data bound in bits/dim, the ODE estimate.

The data bound (Vahdat et al. 2021, eq. 2 and §3) for 8-bit images x with the codec's posterior q(z|x):

    −log P(x) ≤ E_q[−log P(x|z)] − H(q(z|x)) + CE(q(z|x), p(z)),

* P(x|z) is a discretised Gaussian around the decoder's output, with a scale (per pixel or one global)
  fitted by maximum likelihood on training images (``fit_decoder_scale``). A discrete model's P(x) is
  the density of the uniformly dequantised image x + u, u ~ U[0, 1)^D on the 0…255 scale, so
  −log2 P(x) / D is the usual bits/dim and the uniform distribution over 256 levels scores 8.
* H is the differential entropy of q(z|x) over the unnormalised latents z.
* CE(q, p) = E_q[−log p(z)] with p the diffusion prior. The diffusion model works on normalised latents
  z_n = (z − shift)·scale; densities transform as p(z) = p_n(z_n)·Π|scale|, so
  CE = E_q[−log p_n(z_n)] − Σ log|scale| ≤ E_q[VLB(z_n)] − Σ log|scale| (the latent VLB of
  ``diffusion.likelihood`` at z ~ q(z|x), or the ODE's exact −log p_n). The two log|scale| terms of
  H (were it taken over z_n) and CE cancel: the bound does not depend on the normalisation.

All expectations over q are one-sample estimates per image (fresh z, fresh z_t per term), so the
reported standard errors are over images and include that noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from latentdiff.diffusion import likelihood as L
from latentdiff.diffusion.cond import Cond
from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion
from latentdiff.utils.images import to_tensor

LN2 = math.log(2)
SCALES = ("pixel", "global")


def normalisation(autoencoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (c, 1, 1), of the codec's per-channel map z_n = (z − shift)·scale from its latents
    to the diffusion model's (float64, on the CPU)."""
    shift = autoencoder.latent_shift.detach().double().cpu().reshape(-1, 1, 1)
    scale = autoencoder.latent_scale.detach().double().cpu().reshape(-1, 1, 1)
    return shift, scale


def latent_kl_terms(mean: torch.Tensor, logvar: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    prior_nll: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator | None = None,
                    eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """−H(q) and CE(q, p) of q(z|x) = N(mean, e^logvar) against a prior on z_n = (z − shift)·scale.

    `prior_nll(z_n)` is −log p_n(z_n) per sample (or an upper bound such as the VLB). Returns per-sample
    nats: entropy H(q) over z, log_det = Σ log|scale| over the latent dimensions, cross_entropy
    = prior_nll(z_n) − log_det at one z = mean + σ·eps per sample (eps drawn from `generator` unless
    given), and kl = cross_entropy − entropy.
    """
    mean, logvar = mean.double(), logvar.double()
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float64, device=mean.device)
    z = mean + torch.exp(0.5 * logvar) * eps
    shift, scale = shift.to(z), scale.to(z)
    z_n = (z - shift) * scale
    log_det = torch.log(scale.abs()).expand(mean.shape[1:]).sum().expand(len(mean))
    entropy = L.gaussian_entropy(logvar).flatten(1).sum(1)
    cross_entropy = prior_nll(z_n) - log_det
    return {"entropy": entropy, "log_det": log_det, "cross_entropy": cross_entropy, "kl": cross_entropy - entropy}


# --- the decoder's observation model ------------------------------------------------------------

@torch.no_grad()
def _posteriors(pipe: LatentDiffusion, images: np.ndarray, batch_size: int):
    """Yield (x in [-1, 1] as float64, q(z|x)) per batch of uint8 `images`."""
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).to(pipe.device)
        yield x.double(), pipe.autoencoder.encode(x)


@torch.no_grad()
def _decode_sample(pipe: LatentDiffusion, post, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mean + σ·eps ~ q(z|x) (float64) and the decoder's output at z (float64)."""
    z = post.mean.double() + post.std.double() * eps.to(post.mean.device)
    return z, pipe.autoencoder.decode(z.float()).double()


def _best_log_scale(x: torch.Tensor, mean: torch.Tensor, grid: torch.Tensor, per_pixel: bool) -> torch.Tensor:
    """The log σ on `grid` minimising the discretised NLL of x (N, …) summed over images (and pixels if global)."""
    costs = []
    for chunk in grid.split(8):
        nll = L.discretized_gaussian_nll(x[None], mean[None], chunk.exp().view(-1, *[1] * x.ndim))  # (g, N, …)
        costs.append(nll.sum(1) if per_pixel else nll.flatten(1).sum(1))
    return grid[torch.cat(costs).argmin(0)]  # (…) per pixel, or a scalar


def fit_decoder_scale(pipe: LatentDiffusion, train_images: np.ndarray, *, per_pixel: bool = True, seed: int = 0,
                      batch_size: int = 250) -> torch.Tensor:
    """Maximum-likelihood σ of P(x|z) = discretised N(decoder(z), σ²) on uint8 `train_images`, z ~ q(z|x).

    Per pixel, σ has the image's shape (C, H, W); otherwise it is one number. The fit is a grid search
    in log σ over [1e-4, 2] (step 0.25), refined to a step of 0.025 (at most ~2e-4 nats per pixel from the
    optimum, since the NLL's curvature in log σ is about 2 per observation): the objective is one-dimensional
    per pixel, so this is exact to well below the estimator's noise and needs no optimiser.
    """
    if len(train_images) == 0:
        raise ConfigError("fitting the decoder's scale needs at least one training image")
    gen = torch.Generator().manual_seed(seed)
    xs, means = [], []
    for x, post in _posteriors(pipe, train_images, batch_size):
        xs.append(x.cpu())
        means.append(_decode_sample(pipe, post, torch.randn(post.mean.shape, generator=gen, dtype=torch.float64))[1].cpu())
    x, mean = torch.cat(xs), torch.cat(means)
    coarse = torch.arange(math.log(1e-4), math.log(2.0), 0.25, dtype=torch.float64)
    best = _best_log_scale(x, mean, coarse, per_pixel)
    fine = torch.arange(-0.25, 0.2501, 0.025, dtype=torch.float64)
    if per_pixel:  # refine each pixel around its own coarse optimum
        cands = best[None] + fine.view(-1, *[1] * best.ndim)  # (g, C, H, W)
        nll = torch.stack([L.discretized_gaussian_nll(x, mean, c.exp()).sum(0) for c in cands])
        best = torch.gather(cands, 0, nll.argmin(0, keepdim=True))[0]
    else:
        best = _best_log_scale(x, mean, best + fine, per_pixel)
    return best.exp()


# --- the whole-model estimate -------------------------------------------------------------------

def _summary(values: torch.Tensor, per: float) -> dict[str, float]:
    """Mean and standard error over images of per-image totals, divided by `per` (dimensions, ln 2)."""
    v = values.double().cpu() / per
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se}


def _check_images(pipe: LatentDiffusion, images: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"{what} must be uint8 N×H×W×C images")
    c, h, w = pipe.image_shape
    if images.shape[1:] != (h, w, c):
        raise ConfigError(f"{what} are {images.shape[1]}×{images.shape[2]}×{images.shape[3]}, the model takes {h}×{w}×{c}")
    if len(images) == 0:
        raise ConfigError(f"{what}: no images")


def _default_train_images(pipe: LatentDiffusion, n: int) -> np.ndarray:
    from latentdiff.data import load_dataset

    data = load_dataset("bundled", "train", limit=n)
    _check_images(pipe, data.images, "the bundled training images (pass train_images= for this model)")
    return data.images


def evaluate_likelihood(pipe: LatentDiffusion, images: np.ndarray, *, train_images: np.ndarray | None = None,
                        grid_steps: int | None = 100, variance: str = "large", decoder_scale: str = "pixel",
                        fit_images: int = 1000, ode_images: int = 0, ode_steps: int = 50, n_hutchinson: int = 1,
                        labels=None, seed: int = 0, batch_size: int = 100) -> dict:
    """Bits/dim bound, latent VLB and (on the first `ode_images` images) the ODE estimate for uint8 `images`.

    `grid_steps` strides the VLB's grid (None: all T steps), `variance` is the reverse variance ("large"
    β or "small" β̃, see ``diffusion.likelihood``), `decoder_scale` "pixel" or "global" for P(x|z),
    fitted on `train_images` (default: the first `fit_images` bundled training images). `labels` gives
    the class-conditional bound −log P(x|y); by default the model's unconditional (null-label)
    prediction is used. The ODE runs `ode_steps` RK4 steps with `n_hutchinson` Rademacher probes.
    Returns per-term means and standard errors over images, in the units under "units".
    """
    t_start = time.perf_counter()
    _check_images(pipe, images, "images")
    if decoder_scale not in SCALES:
        raise ConfigError(f"decoder_scale must be one of {', '.join(SCALES)}, got {decoder_scale!r}")
    if not 0 <= ode_images <= len(images):
        raise ConfigError(f"ode_images must be between 0 and {len(images)}, got {ode_images}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if labels is not None:
        labels = pipe.request(len(images), labels=labels).label_tensor()
    schedule = pipe.denoiser.schedule
    ts = L.vlb_grid(schedule.num_steps, grid_steps)
    train_images = _default_train_images(pipe, fit_images) if train_images is None else train_images
    _check_images(pipe, train_images, "train_images")
    t_fit = time.perf_counter()
    sigma = fit_decoder_scale(pipe, train_images, per_pixel=decoder_scale == "pixel", seed=seed,
                              batch_size=batch_size).to(pipe.device)
    t_fit = time.perf_counter() - t_fit
    shift, scale = normalisation(pipe.autoencoder)
    gens = [torch.Generator().manual_seed(seed + k) for k in (1, 2, 3)]  # z ~ q, z_t ~ q(z_t|z), trace probes
    rows: dict[str, list[torch.Tensor]] = {}
    done = 0
    for x, post in _posteriors(pipe, images, batch_size):
        y = labels[done:done + len(x)].to(pipe.device) if labels is not None else None
        n_ode = min(len(x), max(ode_images - done, 0))
        terms = _batch_terms(pipe, x, post, y, sigma, (shift, scale), ts, variance, n_ode, ode_steps, n_hutchinson, gens)
        for k, v in terms.items():
            rows.setdefault(k, []).append(v.detach().cpu())
        done += len(x)
    settings = {"grid_steps": len(ts), "num_train_steps": schedule.num_steps, "variance": variance,
                "decoder_scale": decoder_scale, "fit_images": len(train_images), "ode_images": ode_images,
                "ode_steps": ode_steps, "n_hutchinson": n_hutchinson, "conditional": labels is not None, "seed": seed}
    return _result(rows, pipe, len(images), settings, seconds=time.perf_counter() - t_start, fit_seconds=t_fit)


def _batch_terms(pipe, x, post, y, sigma, norm, ts, variance, n_ode, ode_steps, n_hutchinson, gens) -> dict:
    """Per-image nats of every term for one batch; the same z ~ q(z|x) feeds the decoder, H, CE and the ODE."""
    g_q, g_t, g_probe = gens
    schedule = pipe.denoiser.schedule
    fn = pipe.denoiser.bind(Cond(labels=y) if y is not None else None)
    eps = torch.randn(post.mean.shape, generator=g_q, dtype=torch.float64).to(pipe.device)
    vlb: list[L.VLBTerms] = []

    def prior_nll(z_n):
        vlb.append(L.vlb_terms(fn, schedule, z_n, ts, variance=variance, generator=g_t))
        return vlb[-1].total

    shift, scale = norm
    kl = latent_kl_terms(post.mean, post.logvar, shift, scale, prior_nll, eps=eps)
    z, recon = _decode_sample(pipe, post, eps)
    out = {"reconstruction": L.discretized_gaussian_nll(x, recon, sigma).flatten(1).sum(1), **kl,
           "prior": vlb[0].prior, "diffusion": vlb[0].steps.sum(0), "decoder_t0": vlb[0].decoder,
           "latent_vlb": vlb[0].total}
    if n_ode:
        z_n = ((z - shift.to(z)) * scale.to(z))[:n_ode]
        sub = pipe.denoiser.bind(Cond(labels=y[:n_ode]) if y is not None else None)
        out["ode_latent_nll"] = -L.flow_log_likelihood(sub, schedule, z_n, steps=ode_steps, n_probes=n_hutchinson,
                                                       generator=g_probe)
    return out


def _result(rows: dict, pipe: LatentDiffusion, n: int, settings: dict, **timing) -> dict:
    """Per-image nats -> the reported units: latent terms per latent dimension, data terms in bits/dim."""
    cols = {k: torch.cat(v) for k, v in rows.items()}
    d_z = math.prod(pipe.autoencoder.latent_shape)
    d_x = math.prod(pipe.image_shape)
    bound = cols["reconstruction"] + cols["kl"]
    result = {
        "units": {"latent_vlb": "nats per latent dimension (normalised latents)", "data_bound": "bits per dimension",
                  "ode": "nats per latent dimension; data_bound in bits per dimension"},
        "n_images": n, "latent_dims": d_z, "data_dims": d_x, "settings": settings,
        "latent_vlb": {k: _summary(cols[k], d_z) for k in ("prior", "diffusion", "decoder_t0", "latent_vlb")},
        "data_bound": {k: _summary(cols[k], d_x * LN2)
                       for k in ("reconstruction", "entropy", "cross_entropy", "log_det")},
        "uniform_bits_per_dim": 8.0,
    }
    result["data_bound"]["total"] = _summary(bound, d_x * LN2)
    result["bits_per_dim"] = result["data_bound"]["total"]["mean"]
    if "ode_latent_nll" in cols:
        m = len(cols["ode_latent_nll"])
        ode_ce = cols["ode_latent_nll"] - cols["log_det"][:m]
        ode_bound = cols["reconstruction"][:m] - cols["entropy"][:m] + ode_ce
        result["ode"] = {"n_images": m, "latent_nll": _summary(cols["ode_latent_nll"], d_z),
                         "latent_vlb_same_images": _summary(cols["latent_vlb"][:m], d_z),
                         "vlb_minus_ode": _summary(cols["latent_vlb"][:m] - cols["ode_latent_nll"], d_z),
                         "data_bound": _summary(ode_bound, d_x * LN2)}
    result.update({k: round(v, 2) for k, v in timing.items()})
    return result


def format_likelihood_table(result: dict) -> str:
    """A plain-text table of `evaluate_likelihood`'s result (what ``latentdiff eval --likelihood`` prints)."""
    s = result["settings"]
    head = (f"likelihood on {result['n_images']} images ({result['data_dims']} data dims, {result['latent_dims']} "
            f"latent dims); grid {s['grid_steps']}/{s['num_train_steps']} steps, variance {s['variance']}, "
            f"decoder scale per {s['decoder_scale']} (fitted on {s['fit_images']} images)")
    lines = [head, f"{'term':<40} {'mean':>10} {'± se':>9}"]

    def row(name, v):
        lines.append(f"{name:<40} {v['mean']:>10.4f} {v['se']:>9.4f}")

    for k, v in result["latent_vlb"].items():
        row(f"latent {k} [nats/latent dim]", v)
    for k, v in result["data_bound"].items():
        row(f"data {k} [bits/dim]", v)
    if "ode" in result:
        o = result["ode"]
        row(f"ODE latent NLL, {o['n_images']} images [nats/latent dim]", o["latent_nll"])
        row("VLB − ODE, same images [nats/latent dim]", o["vlb_minus_ode"])
        row("ODE data bound [bits/dim]", o["data_bound"])
    lines.append(f"{'bits/dim (VLB data bound)':<40} {result['bits_per_dim']:>10.4f}   uniform 8-bit: "
                 f"{result['uniform_bits_per_dim']:.1f}")
    return "\n".join(lines)
