"""Reverse-process samplers as pure functions.

Each sampler has the signature
    sampler(denoiser, x, schedule, ts, *, generator=None, callback=None, **options) -> x0
where ``denoiser(x_t, t) -> Prediction`` (see ``denoiser.py``), ``x`` is the starting noise
x_T ~ N(0, I), and ``ts`` is a descending tensor of integer timesteps (``schedule.timesteps``).
Nothing is kept between calls. ``callback(i, n, x0_hat)`` is called after every step.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import ConfigError
from .schedule import NoiseSchedule, timesteps

Callback = Callable[[int, int, torch.Tensor], None] | None


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _prev(ts: torch.Tensor, i: int) -> int:
    return int(ts[i + 1]) if i + 1 < len(ts) else -1  # -1: ᾱ = 1, the clean data


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """Ancestral sampling from p(x_{t'} | x_t) = q(x_{t'} | x_t, x̂0) (DDPM Algorithm 2).

    With ``ts`` = all T steps this is the original sampler; with a strided grid it uses the
    posterior of the strided chain (Nichol & Dhariwal 2021, §4), with variance β̃.
    """
    for i, t in enumerate(ts.tolist()):
        t_prev = _prev(ts, i)
        pred = denoiser(x, _t(x, t))
        mean, var = schedule.posterior(pred.x0, x, _t(x, t), _t(x, t_prev))
        x = mean + var.sqrt() * _noise(x, generator) if t_prev >= 0 else mean
        if callback:
            callback(i, len(ts), pred.x0)
    return x


@torch.no_grad()
def ddim(denoiser, x, schedule: NoiseSchedule, ts, *, eta: float = 0.0, generator=None, callback: Callback = None):
    """DDIM (Song et al. 2021, eq. 12): deterministic at η = 0, DDPM-like at η = 1.

    x_{t'} = sqrt(ᾱ_{t'}) x̂0 + sqrt(1-ᾱ_{t'}-σ²) ε̂ + σ z,
    σ = η sqrt((1-ᾱ_{t'})/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_{t'}).
    """
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")
    for i, t in enumerate(ts.tolist()):
        t_prev = _prev(ts, i)
        pred = denoiser(x, _t(x, t))
        a_t, a_p = float(schedule.abar(t)), float(schedule.abar(t_prev))
        sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
        x = a_p**0.5 * pred.x0 + max(1 - a_p - sigma**2, 0.0) ** 0.5 * pred.eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if callback:
            callback(i, len(ts), pred.x0)
    return x


@torch.no_grad()
def ddim_invert(denoiser, x0, schedule: NoiseSchedule, ts, *, callback: Callback = None):
    """Deterministic DDIM run forwards (x_0 -> x_T) along the ascending reverse of ``ts``.

    Uses ε̂ evaluated at the current (lower) noise level, the usual first-order approximation
    (Mokady et al. 2023); ``ddim(..., eta=0)`` over the same ``ts`` approximately undoes it.
    """
    asc = ts.flip(0).tolist()
    x, t_cur = x0, -1
    for i, t in enumerate(asc):
        if t_cur < 0:
            eps = denoiser(x, _t(x, asc[0])).eps  # at ᾱ = 1 the net was never trained: use the first level
        else:
            eps = denoiser(x, _t(x, t_cur)).eps
        a_c, a_n = float(schedule.abar(t_cur)), float(schedule.abar(t))
        x0_hat = (x - (1 - a_c) ** 0.5 * eps) / a_c**0.5
        x = a_n**0.5 * x0_hat + (1 - a_n) ** 0.5 * eps
        t_cur = t
        if callback:
            callback(i, len(asc), x0_hat)
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim}


def sample(denoiser, noise, schedule: NoiseSchedule, *, sampler: str = "ddim", steps: int = 50,
           spacing: str | None = None, generator=None, callback: Callback = None, **options):
    """Run a named sampler over a timestep grid of ``steps`` steps."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    # "trailing" starts every grid at t = T-1 (pure noise); with steps = T it is every timestep
    ts = timesteps(schedule.num_steps, steps, spacing or "trailing").to(noise.device)
    return SAMPLERS[sampler](denoiser, noise, schedule, ts, generator=generator, callback=callback, **options)
