"""Discrete-time Gaussian noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021).

Forward process  q(x_t | x_{t-1}) = N(sqrt(1-β_t) x_{t-1}, β_t I)                (DDPM eq. 2)
Closed form      q(x_t | x_0)     = N(sqrt(ᾱ_t) x_0, (1-ᾱ_t) I),  ᾱ_t = Π_{s<=t} (1-β_s)  (eq. 4)

Timesteps are 0-based (t = 0 … T-1) as in diffusers; ᾱ is computed in float64 and cast on use,
so that 1-ᾱ_t near t = 0 keeps its precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentdiff.errors import ConfigError

SCHEDULES = ("linear", "scaled-linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")


def make_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_1…β_T (float64) for a named schedule."""
    if num_steps < 2:
        raise ConfigError(f"num_train_steps must be >= 2, got {num_steps}")
    if kind == "linear":  # DDPM: β linear from 1e-4 to 0.02 for T = 1000
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind == "scaled-linear":  # Stable Diffusion: linear in sqrt(β)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal eq. 17, with β clipped at 0.999
        s = 0.008
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(ᾱ) so that ᾱ_T = 0 exactly (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) -> (B, 1, 1, …) matching x's rank and dtype."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class NoiseSchedule:
    """β_t and the quantities derived from it; the single source of truth for noise levels."""

    betas: torch.Tensor  # (T,) float64

    @classmethod
    def create(cls, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        betas = make_betas(kind, num_steps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    def __post_init__(self):
        self.betas = self.betas.to(torch.float64)
        if not (self.betas.ndim == 1 and bool(((self.betas > 0) & (self.betas <= 1)).all())):
            raise ConfigError("betas must be a 1-D tensor with values in (0, 1]")
        self.alphas = 1 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)  # ᾱ_t, strictly decreasing
        self._tables: dict = {}

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A per-device copy of a lookup table, so indexing on the GPU never syncs with the host."""
        key = (name, str(device))
        if key not in self._tables:
            base = {"abar": torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar]),  # index t+1; t = -1 -> 1
                    "beta": self.betas}[name]
            self._tables[key] = base.to(device)
        return self._tables[key]

    def abar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t for integer timesteps; t = -1 means 'before the first step' (ᾱ = 1)."""
        t = torch.as_tensor(t, dtype=torch.long)
        return self._table("abar", t.device)[t + 1]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t)."""
        a = self.abar(t)
        return a / (1 - a)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The equivalent variance-exploding noise level σ_t = sqrt((1-ᾱ_t)/ᾱ_t) (Karras et al.)."""
        return (1 / self.snr(t)).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε."""
        a = per_sample(self.abar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def step_noise(self, x_prev: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_{t-1}): x_t = sqrt(1-β_t) x_{t-1} + sqrt(β_t) ε."""
        t = torch.as_tensor(t, dtype=torch.long)
        b = per_sample(self._table("beta", t.device)[t], x_prev)
        return (1 - b).sqrt() * x_prev + b.sqrt() * eps

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
        """Mean and variance of q(x_{t'} | x_t, x_0) for t' < t (DDPM eq. 6-7, generalised to strides).

        With α = ᾱ_t/ᾱ_{t'} and β = 1-α the one-stride posterior is
        mean = sqrt(ᾱ_{t'}) β/(1-ᾱ_t) x_0 + sqrt(α)(1-ᾱ_{t'})/(1-ᾱ_t) x_t,  var = β (1-ᾱ_{t'})/(1-ᾱ_t).
        """
        a_t, a_p = per_sample(self.abar(t), xt), per_sample(self.abar(t_prev), xt)
        alpha = a_t / a_p
        beta = 1 - alpha
        mean = a_p.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_p) / (1 - a_t) * xt
        var = beta * (1 - a_p) / (1 - a_t)
        return mean, var


# --- conversions between the parameterisations, with a = sqrt(ᾱ_t), s = sqrt(1-ᾱ_t) -------------
# x_t = a x0 + s ε,   v = a ε - s x0   (Salimans & Ho 2022, §4)

def _as(abar: torch.Tensor, x: torch.Tensor):
    abar = per_sample(abar, x)
    return abar.sqrt(), (1 - abar).sqrt()


def eps_to_x0(xt, eps, abar):
    a, s = _as(abar, xt)
    return (xt - s * eps) / a


def x0_to_eps(xt, x0, abar):
    a, s = _as(abar, xt)
    return (xt - a * x0) / s


def v_to_x0(xt, v, abar):
    a, s = _as(abar, xt)
    return a * xt - s * v


def v_to_eps(xt, v, abar):
    a, s = _as(abar, xt)
    return s * xt + a * v


def v_target(x0, eps, abar):
    a, s = _as(abar, x0)
    return a * eps - s * x0
