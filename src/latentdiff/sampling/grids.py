"""Timestep grids for sampling: functions returning descending integer tensors (STYLE.md #3).

Every grid implicitly ends at t = -1 (ᾱ = 1: the clean data); the samplers take it as given.
"""

from __future__ import annotations

import torch

from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError

SPACINGS = ("trailing", "leading", "linspace", "uniform")  # grids that depend on T alone
ALL_SPACINGS = (*SPACINGS, "karras")  # "karras" also needs the schedule's noise levels


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, i = 0…n-1 (Karras et al. 2022, eq. 5), float64."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def nearest_timesteps(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The discrete t whose σ_t is nearest to each σ in log σ (σ spans orders of magnitude), as long."""
    log_sig = 0.5 * (torch.log1p(-schedule.alpha_bar) - torch.log(schedule.alpha_bar))  # (T,), increasing in t
    q = torch.log(sigmas.to(torch.float64))
    hi = torch.searchsorted(log_sig, q).clamp(1, len(log_sig) - 1)  # log_sig[hi-1] < q <= log_sig[hi]
    lo = hi - 1
    return torch.where((q - log_sig[lo]).abs() <= (log_sig[hi] - q).abs(), lo, hi)


def check_grid(num_train_steps: int, num_steps, spacing: str) -> int:
    """The one check of a grid's request: `num_steps` an integer in 1…T and `spacing` a known grid name."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_steps:
        raise ConfigError(f"steps must be an integer between 1 and {num_train_steps}, got {num_steps!r}")
    if spacing not in ALL_SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(ALL_SPACINGS)}")
    return num_steps


def timesteps(num_train_steps: int, num_steps: int, spacing: str = "trailing",
              schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """At most `num_steps` distinct timesteps in descending order, ending near t = 0.

    "trailing" always includes t = T-1 (pure noise), which matters for few steps (Lin et al. 2023,
    table 2); "leading" is the DDIM paper's  t = k·T/S; "linspace" rounds an even grid from T-1 to 0
    and "uniform" is another name for it. These give exactly `num_steps` timesteps.
    "karras" (needs `schedule`) takes Karras et al.'s ρ = 7 grid of σ between σ_0 and σ_{T-1}, maps
    each σ to the nearest timestep and drops repeats, so it can return fewer than `num_steps` when
    the grid is finer than the discrete σ_t near t = 0. It always starts at T-1: where σ_{T-1} = ∞
    (zero terminal SNR) the ρ-grid spans σ_0…σ_{T-2} and its first point is replaced by T-1.
    """
    check_grid(num_train_steps, int(num_steps), spacing)
    T = num_train_steps
    if spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)).long() - 1
    elif spacing == "leading":
        ts = (torch.arange(num_steps, dtype=torch.long) * (T // num_steps)).flip(0)
    elif spacing in ("linspace", "uniform"):
        ts = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long()
    else:  # "karras"
        if schedule is None:
            raise ConfigError("the karras timestep spacing needs the noise schedule (pass schedule=...)")
        if schedule.num_steps != T:
            raise ConfigError(f"the schedule has {schedule.num_steps} steps, not {T}")
        sig = schedule.sigma(torch.arange(T))  # (T,) float64, increasing; σ_{T-1} = ∞ at zero terminal SNR
        top = T - 1 if bool(torch.isfinite(sig[-1])) else T - 2
        ts = nearest_timesteps(schedule, karras_sigmas(float(sig[0]), float(sig[top]), num_steps))
        ts[0] = T - 1
    ts = torch.unique(ts.clamp(0, T - 1)).flip(0)
    return ts
