"""Reverse-process samplers as pure functions.

Each sampler has the signature
    sampler(denoiser, x, schedule, ts, *, generator=None, callback=None, **options) -> x0
where ``denoiser(x_t, t) -> Prediction`` (see ``denoiser.py``), ``x`` is the starting noise
x_T ~ N(0, I), and ``ts`` is a descending tensor of integer timesteps (``schedule.timesteps``);
every grid implicitly ends at t = -1 (ᾱ = 1, σ = 0: the clean data). Nothing is kept between
calls. ``callback(i, n, x0_hat)`` is called after every step. Guidance wrappers return the same
denoiser contract, so every sampler works with every kind of guidance.

Notation: α_t = sqrt(ᾱ_t) and σ_t = sqrt(1-ᾱ_t) (variance preserving), λ_t = log(α_t/σ_t) (half the
log-SNR), and in the variance-exploding view of Karras et al. x̃ = x/α_t, σ̃_t = σ_t/α_t.

Deterministic (same noise in, same output out; no ``generator`` draws): ``ddim`` with η = 0, ``euler``,
``heun``, ``dpmpp-2m``, ``unipc``. Stochastic: ``ddpm``, ``ddim`` with η > 0, ``dpmpp-2m-sde``.
``nfe(name, steps)`` gives the network evaluations a run costs (a classifier-free-guided evaluation
is one batched call and counts once).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError
from latentdiff.sampling.grids import timesteps

Callback = Callable[[int, int, torch.Tensor], None] | None


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _prev(ts: torch.Tensor, i: int) -> int:
    return int(ts[i + 1]) if i + 1 < len(ts) else -1  # -1: ᾱ = 1, the clean data


def _levels(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) in float64 for one timestep; λ = -∞ where ᾱ = 0, +∞ at t = -1 (ᾱ = 1)."""
    abar = float(schedule.abar(t))
    alpha, sigma = abar**0.5, (1 - abar) ** 0.5
    if sigma == 0:
        return alpha, sigma, math.inf
    if alpha == 0:
        return alpha, sigma, -math.inf
    return alpha, sigma, math.log(alpha) - math.log(sigma)


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


def _dpmpp_2m(denoiser, x, schedule: NoiseSchedule, ts, sde: bool, generator, callback: Callback):
    """The DPM-Solver++(2M) loop shared by the ODE and SDE forms: they differ only in the update.

    With h = λ_{t'} - λ_t and r = h_prev / h, both use the multistep data estimate
    D = x̂0_t + (1/(2r)) (x̂0_t - x̂0_prev), which is x̂0_t on the first step (no history) and on the
    last (to σ = 0, where h = ∞): there the solvers are first order.
    """
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts.tolist()):
        t_prev = _prev(ts, i)
        pred = denoiser(x, _t(x, t))
        (_, s_s, l_s), (a_t, s_t, l_t) = _levels(schedule, t), _levels(schedule, t_prev)
        h = l_t - l_s
        d = pred.x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            d = pred.x0 + h / (2 * h_prev) * (pred.x0 - x0_prev)
        if sde:
            e2h = math.exp(-2 * h)  # 0 at σ_t = 0 (h = ∞) and at ᾱ_s = 0 (λ_s = -∞)
            x = (s_t / s_s) * math.exp(-h) * x + a_t * (1 - e2h) * d
            if s_t > 0:
                x = x + s_t * math.sqrt(1 - e2h) * _noise(x, generator)
        else:
            x = (s_t / s_s) * x + a_t * (-math.expm1(-h)) * d
        x0_prev, h_prev = pred.x0, h
        if callback:
            callback(i, len(ts), pred.x0)
    return x


@torch.no_grad()
def dpmpp_2m(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, second order in λ, data prediction.

        x_{t'} = (σ_{t'}/σ_t) x_t + α_{t'} (1 - e^{-h}) D,   D = (1 + 1/(2r)) x̂0_t - 1/(2r) x̂0_prev,
    with h = λ_{t'} - λ_t and r = h_prev / h; first order on the first and the last step.
    """
    return _dpmpp_2m(denoiser, x, schedule, ts, False, generator, callback)


@torch.no_grad()
def dpmpp_2m_sde(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5 / appendix; the 'midpoint' form), noise from `generator`.

        x_{t'} = (σ_{t'}/σ_t) e^{-h} x_t + α_{t'} (1 - e^{-2h}) (x̂0_t + D1/2) + σ_{t'} sqrt(1 - e^{-2h}) z,
    D1 = (x̂0_t - x̂0_prev)/r with r = h_prev/h (so x̂0_t + D1/2 is the same D as in :func:`dpmpp_2m`);
    D1 = 0 on the first step and on the last (to σ = 0). The D1-free part solves the reverse SDE
    exactly for a constant x̂0 (for a point mass the marginals q(x_{t'}) are matched exactly).
    """
    return _dpmpp_2m(denoiser, x, schedule, ts, True, generator, callback)


def _sigma_tilde(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(α_t, σ̃_t) with σ̃_t = sqrt((1-ᾱ_t)/ᾱ_t): ∞ where ᾱ = 0, 0 at t = -1."""
    a, s, _ = _levels(schedule, t)
    return a, (s / a if a > 0 else math.inf)


def _karras(denoiser, x, schedule: NoiseSchedule, ts, second_order: bool, callback: Callback):
    """Karras et al. 2022, Algorithm 1 (S_churn = 0) on dx̃/dσ̃ = (x̃ - x̂0)/σ̃ = ε̂, in x̃ = x/α_t.

    The network sees VP inputs x_t = α_t x̃. ε̂ from the denoiser is the slope d. Where σ̃_t = ∞
    (zero terminal SNR) the Euler step's limit x̃' = x̂0 + σ̃' ε̂ is taken and Heun's correction,
    which has no such limit, is skipped.
    """
    a, sig = _sigma_tilde(schedule, int(ts[0]))
    xt = x  # the VP state the network sees; x̃ = xt / α
    for i, t in enumerate(ts.tolist()):
        t_prev = _prev(ts, i)
        a_n, sig_n = _sigma_tilde(schedule, t_prev)
        pred = denoiser(xt, _t(xt, t))
        if math.isinf(sig):
            x_next = pred.x0 + sig_n * pred.eps
        else:
            x_tilde = xt / a
            x_next = x_tilde + (sig_n - sig) * pred.eps
            if second_order and sig_n > 0:  # Heun: average the slopes at both ends (none at σ̃ = 0)
                eps_n = denoiser(a_n * x_next, _t(xt, t_prev)).eps
                x_next = x_tilde + (sig_n - sig) * 0.5 * (pred.eps + eps_n)
        xt, a, sig = a_n * x_next, a_n, sig_n
        if callback:
            callback(i, len(ts), pred.x0)
    return xt


@torch.no_grad()
def euler(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """Euler's method on the probability-flow ODE in Karras σ̃-space (Karras et al. 2022, Alg. 1 without
    the correction): x̃_{i+1} = x̃_i + (σ̃_{i+1} - σ̃_i) ε̂_i. Mathematically the same map as DDIM at η = 0."""
    return _karras(denoiser, x, schedule, ts, False, callback)


@torch.no_grad()
def heun(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, S_churn = 0):
    x̃' = x̃_i + (σ̃_{i+1} - σ̃_i) ε̂_i, then x̃_{i+1} = x̃_i + (σ̃_{i+1} - σ̃_i)(ε̂_i + ε̂(x̃'))/2, except at σ̃_{i+1} = 0.
    Costs 2·steps - 1 network evaluations."""
    return _karras(denoiser, x, schedule, ts, True, callback)


def _unipc_rhos(h: float, rk: float | None) -> tuple[float, float | None]:
    """UniC weights for B(h) = e^{-h} - 1 ('bh2'), in data prediction (Zhao et al. 2023).

    Solves R ρ = b with R = [[1, 1], [r_k, 1]] (columns: history point, new point) and
    b_i = i! g_i / B(h), g_1 = (e^{-h} - 1)/(-h) - 1, g_2 = g_1/(-h) - 1/2 (the φ-function recursion).
    Returns (ρ for the new point, ρ for the history point, None at order 1).
    """
    hh = -h
    bh = math.expm1(hh)
    g1 = bh / hh - 1
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / bh, 2 * g2 / bh
    if rk is None:
        return 0.5, None  # order 1: the trapezoid weight, as in the reference implementation
    rho_hist = (b1 - b2) / (1 - rk)  # solve [[1, 1], [rk, 1]] ρ = [b1, b2]
    return b1 - rho_hist, rho_hist


@torch.no_grad()
def unipc(denoiser, x, schedule: NoiseSchedule, ts, *, generator=None, callback: Callback = None):
    """UniPC-bh2 of order 2 (Zhao et al. 2023): the UniP-2 predictor (= DPM-Solver++(2M)) and the
    UniC corrector, in data prediction with B(h) = e^{-h} - 1.

    The network is evaluated once at each point t' the predictor reaches; that x̂0_{t'} first corrects
    the point (from its predecessor t with the same increment, now including x̂0_{t'}; skipped after a
    start at ᾱ = 0, where h = ∞),
        x_{t'}^c = (σ_{t'}/σ_t) x_t + α_{t'}(1-e^{-h}) x̂0_t - α_{t'} B(h) (ρ_n (x̂0_{t'} - x̂0_t) + ρ_o D1),
    D1 = (x̂0_o - x̂0_t)/r_k, r_k = (λ_o - λ_t)/h for the point o before t, then drives the next
    predictor step, so the corrector costs no extra evaluation (the x̂0 at the corrected point is
    the one evaluated before the correction). The last step, to σ = 0, is first order and not corrected.
    """
    older = None  # (λ, x̂0) at the point before `last`
    last = None  # (t, λ, x̂0, x) at the previous point; x is the state there
    for i, t in enumerate(ts.tolist()):
        t_prev = _prev(ts, i)
        pred = denoiser(x, _t(x, t))
        a_c, s_c, l_c = _levels(schedule, t)
        if last is not None and math.isfinite(last[1]):  # UniC: redo the step last -> t including x̂0_t
            t_s, l_s, m_s, x_s = last
            s_s, h = _levels(schedule, t_s)[1], l_c - l_s
            rk = (older[0] - l_s) / h if older is not None and math.isfinite(older[0]) else None
            rho_new, rho_old = _unipc_rhos(h, rk)
            corr = rho_new * (pred.x0 - m_s)
            if rho_old is not None:
                corr = corr + rho_old * (older[1] - m_s) / rk
            b_h = math.expm1(-h)
            x = (s_c / s_s) * x_s - a_c * b_h * m_s - a_c * b_h * corr
        if last is not None:
            older = last[1:3]
        last = (t, l_c, pred.x0, x)
        # UniP-2 from t to t_prev; first order on the first step, after λ = -∞, and to σ = 0 (h = ∞)
        a_t, s_t, l_t = _levels(schedule, t_prev)
        h = l_t - l_c
        d = pred.x0
        if older is not None and math.isfinite(h) and math.isfinite(older[0]):
            rk = (older[0] - l_c) / h  # = -h_prev/h = -r
            d = pred.x0 + 0.5 * (older[1] - pred.x0) / rk  # = x̂0 + (x̂0 - x̂0_prev)/(2r)
        x = (s_t / s_c) * x + a_t * (-math.expm1(-h)) * d
        if callback:
            callback(i, len(ts), pred.x0)
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp-2m": dpmpp_2m,
            "dpmpp-2m-sde": dpmpp_2m_sde, "unipc": unipc}


def check_sampler(name: str) -> str:
    """`name` if it is a sampler of :data:`SAMPLERS`, else a ConfigError listing them."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def nfe(name: str, steps: int) -> int:
    """Network evaluations a `steps`-step run of sampler `name` costs (Heun: 2·steps - 1; the others: steps).

    `steps` is the length of the timestep grid; a "karras" grid may be shorter than requested. On a
    zero-terminal-SNR schedule Heun saves one more evaluation (no correction from σ̃ = ∞).
    """
    check_sampler(name)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    return 2 * steps - 1 if name == "heun" else steps


def steps_for_nfe(name: str, budget: int) -> int:
    """The most steps whose run of sampler `name` costs at most `budget` network evaluations."""
    check_sampler(name)
    if budget < 1:
        raise ConfigError(f"an NFE budget must be >= 1, got {budget}")
    return (budget + 1) // 2 if name == "heun" else budget


def sample(denoiser, noise, schedule: NoiseSchedule, *, sampler: str = "ddim", steps: int = 50,
           spacing: str | None = None, generator=None, callback: Callback = None, **options):
    """Run a named sampler over a timestep grid of ``steps`` steps with the given ``spacing``
    (``sampling.grids.ALL_SPACINGS``; default "trailing")."""
    check_sampler(sampler)
    # "trailing" starts every grid at t = T-1 (pure noise); with steps = T it is every timestep
    ts = timesteps(schedule.num_steps, steps, spacing or "trailing", schedule).to(noise.device)
    return SAMPLERS[sampler](denoiser, noise, schedule, ts, generator=generator, callback=callback, **options)
