"""Gradient guidance as denoiser -> denoiser wrappers: classifier guidance (a noise-aware classifier's
log p(y | x_t)) and user guidance (any objective on x̂0 or, through `decoded`, on the decoded image; e.g.
`brightness`, `region_mean`), both through one shift, :func:`gradient_guidance`.
"""

from __future__ import annotations

from typing import Callable

import torch

from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import DenoiserFn, Prediction
from latentdiff.diffusion.schedule import NoiseSchedule, per_sample
from latentdiff.errors import ConfigError

Objective = Callable[[torch.Tensor], torch.Tensor]  # x̂0 (B, C, H, W) -> per-sample score (B,), higher is better


Score = Callable[[torch.Tensor, torch.Tensor, Prediction], torch.Tensor]  # (x_t, t, prediction) -> (B,)


def gradient_guidance(denoiser: DenoiserFn, score: Score, scale: float, schedule: NoiseSchedule, *,
                      through_denoiser: bool = True) -> DenoiserFn:
    """Shift a denoiser's prediction along g = ∇_{x_t} score (Dhariwal & Nichol 2021, eq. 14 / Algorithm 2).

    With σ_t = sqrt(1-ᾱ_t):   ε̂' = ε̂ - s σ_t g,   x̂0' = x̂0 + s σ_t² / sqrt(ᾱ_t) · g,
    so that x_t = sqrt(ᾱ_t) x̂0' + σ_t ε̂' still holds and every sampler can use the pair. `score`
    sees x_t (requiring grad), t and the prediction; with `through_denoiser` the prediction is part
    of the graph (objectives of x̂0), without it the denoiser runs under no_grad (scores of x_t
    alone, such as a noise-aware classifier, need no backward pass through the U-Net).
    scale 0 returns the denoiser unchanged.
    """
    if scale == 0:
        return denoiser

    def fn(xt: torch.Tensor, t: torch.Tensor) -> Prediction:
        with torch.enable_grad():  # samplers run under no_grad
            x = xt.detach().requires_grad_(True)
            with torch.set_grad_enabled(through_denoiser):
                pred = denoiser(x, t)
            value = score(x, t, pred)
            if value.shape != (x.shape[0],):
                raise ConfigError(f"a guidance objective must return one score per sample, shape ({x.shape[0]},); "
                                  f"got {tuple(value.shape)}")
            (g,) = torch.autograd.grad(value.sum(), x)  # samples are independent: ∇ of the sum is per-sample ∇
        abar = per_sample(schedule.abar(t), pred.x0)
        sigma = (1 - abar).sqrt()
        x0 = pred.x0.detach() + scale * sigma**2 / abar.sqrt() * g
        eps = pred.eps.detach() - scale * sigma * g
        return Prediction(x0, eps)

    return fn


def user_guidance(denoiser: DenoiserFn, objective: Objective, scale: float, schedule: NoiseSchedule) -> DenoiserFn:
    """Gradient guidance towards a differentiable per-sample objective f(x̂0) (higher is better).

    Classifier guidance with log p(y|x_t) replaced by f(x̂0(x_t)), the "forward universal guidance"
    of Bansal et al. 2023 (§3.1): :func:`gradient_guidance` with g = ∇_{x_t} f(x̂0(x_t)),
    back-propagated through the denoiser. The objective sees normalised latents; to score decoded
    images wrap an image objective with :func:`decoded`.
    """
    return gradient_guidance(denoiser, lambda x, t, pred: objective(pred.x0), scale, schedule)


def classifier_guidance(denoiser: DenoiserFn, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        target: Cond | torch.Tensor, scale: float, schedule: NoiseSchedule) -> DenoiserFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2): g = ∇_{x_t} log p_φ(y | x_t, t).

    `classifier(x_t, t)` returns logits (B, K) of a noise-aware classifier trained on noisy latents
    (``models/classifier.py``); `target` holds the requested classes (a Cond with labels, or a (B,) tensor). ε̂' = ε̂ - s sqrt(1-ᾱ_t) g (eq. 14),
    with x̂0 shifted consistently (:func:`gradient_guidance`). It wraps any denoiser, e.g. a
    classifier-free guided one, so the two compose.
    """
    labels = target.labels if isinstance(target, Cond) else target
    if labels is None:
        raise ConfigError("classifier guidance needs the classes to guide towards")

    def log_prob(x: torch.Tensor, t: torch.Tensor, pred: Prediction) -> torch.Tensor:
        logits = classifier(x, t)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (B, K)
        return logp.gather(1, labels.to(logp.device).reshape(-1, 1))[:, 0]

    return gradient_guidance(denoiser, log_prob, scale, schedule, through_denoiser=False)


def decoded(autoencoder, image_objective: Objective) -> Objective:
    """Lift an objective on images in [-1, 1] (B, C, H, W) to one on normalised latents, through the decoder."""

    def objective(z: torch.Tensor) -> torch.Tensor:
        return image_objective(autoencoder.from_latent(z))

    return objective


def brightness(target: float) -> Objective:
    """-(mean pixel - target)² per image; `target` in [-1, 1] (-1 black, 1 white)."""

    def objective(x: torch.Tensor) -> torch.Tensor:
        return -(x.flatten(1).mean(1) - target) ** 2

    return objective


def region_mean(box: tuple[int, int, int, int], target: float) -> Objective:
    """-(mean over the region x0 <= x < x1, y0 <= y < y1 - target)² per image; `target` in [-1, 1]."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ConfigError(f"region must satisfy 0 <= x0 < x1 and 0 <= y0 < y1, got {box}")

    def objective(x: torch.Tensor) -> torch.Tensor:
        if x1 > x.shape[-1] or y1 > x.shape[-2]:
            raise ConfigError(f"region {box} lies outside the {x.shape[-1]}×{x.shape[-2]} image")
        return -(x[..., y0:y1, x0:x1].flatten(1).mean(1) - target) ** 2

    return objective
