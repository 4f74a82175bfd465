"""Likelihood terms of a diffusion model on continuous latents: the VLB and the probability-flow ODE.

Timesteps are 0-based as in ``schedule.py``: t = 0 … T-1 is DDPM's x_1 … x_T and t = -1 (ᾱ = 1) the
clean latent z_0. Over a descending grid t_K > … > t_1 (``vlb_grid``; the full grid is T-1 … 0) the
variational bound (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 §2; Kingma et al. 2021 for the
continuous-latent reading) is

    −log p(z_0) ≤ L_prior + Σ_k L_k + L_0,
    L_prior = KL(q(z_{t_K} | z_0) ‖ N(0, I)),
    L_k     = E_q KL(q(z_{t_{k-1}} | z_{t_k}, z_0) ‖ p_θ(z_{t_{k-1}} | z_{t_k})),   k = K … 2,
    L_0     = E_q [−log p_θ(z_0 | z_{t_1})],

with p_θ(z_{t'} | z_t) = N(μ̃(x̂0, z_t), σ²) — the posterior mean of the (strided) chain at the model's
x̂0, as ``samplers.ddpm`` samples it — and σ² the reverse variance:

* ``"small"``: β̃ = (1-ᾱ_{t'})/(1-ᾱ_t) · (1-ᾱ_t/ᾱ_{t'}), the posterior variance (the lower of DDPM's two
  choices, the one the DDPM sampler uses, and exact when the data is a point);
* ``"large"``: β = 1-ᾱ_t/ᾱ_{t'} (exact when the data is N(0, I)).

The latents are continuous, so L_0 is a Gaussian *density*, N(z_0; x̂0(z_{t_1}), σ̃²_{t_1}) with
σ̃²_t = (1-ᾱ_t)/ᾱ_t: the variance of z_0 given z_t when the data density is flat on that scale (β̃ is
zero there, so improved DDPM's clipping would be arbitrary). L_0 can be negative; the discretisation
of 8-bit data lives in the decoder term of the data bound (``discretized_gaussian_nll``).

The same grid, strided, gives the bound of the shorter chain (looser, never below −log p). Every term
is returned in nats, summed over the latent dimensions, in float64.

The probability-flow ODE (Song et al. 2021, eq. 13 and App. D.2) is integrated in x̃ = z_t/√ᾱ_t, the
variance-exploding view, where with v = σ̃² = (1-ᾱ)/ᾱ and D = x̂0

    dx̃/dv = (x̃ − D(x̃, v)) / (2v),    d log p_v(x̃(v))/dv = −div_x̃ (dx̃/dv),

so log p(z_0) = log p_T(x̃_T) + ∫ div dv, with p_T from the prior z_T ~ N(0, I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentdiff.diffusion.denoiser import DenoiserFn
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError

VARIANCES = ("small", "large")
PROBES = ("rademacher", "gaussian")
LOG_2PI = math.log(2 * math.pi)


# --- closed-form Gaussian terms (elementwise) -------------------------------------------------------

def normal_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) ‖ N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def gaussian_nll(x, mean, var) -> torch.Tensor:
    """−log N(x; mean, var) elementwise, in nats (a density: can be negative)."""
    return 0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def gaussian_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """Differential entropy ½ log(2πe σ²) of N(·, σ²) elementwise, in nats."""
    return 0.5 * (LOG_2PI + 1 + logvar)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a − e^b) for a > b, without cancellation."""
    return a + torch.log(-torch.expm1(b - a))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, levels: int = 256):
    """−log P(x) elementwise for x on the grid of `levels` values spanning [-1, 1] (8-bit: x = k/127.5 − 1).

    P(x) is the mass of N(mean, scale²) on x's bin [x − h, x + h], h = 1/(levels − 1), with the two
    edge bins open to ∓∞ (Ho et al. 2020 §3.3), so P sums to one over the levels. Tail masses are
    taken on the side where they are small (log Φ), so a bin far from the mean is not rounded to 0.
    """
    h = 1.0 / (levels - 1)
    a, b = (x - h - mean) / scale, (x + h - mean) / scale  # the bin's edges in standard units
    log_phi = torch.special.log_ndtr
    # mass = Φ(b) − Φ(a) = Φ(−a) − Φ(−b); use the lower tail on the side of the mean the bin lies on
    upper = a > 0
    hi = torch.where(upper, log_phi(-a), log_phi(b))
    lo = torch.where(upper, log_phi(-b), log_phi(a))
    log_mass = _log_sub_exp(hi, lo)
    log_mass = torch.where(x < -1 + h / 2, log_phi(b), log_mass)  # lowest bin (−∞, −1 + h]
    log_mass = torch.where(x > 1 - h / 2, log_phi(-a), log_mass)  # highest bin [1 − h, ∞)
    return -log_mass


# --- the variational bound ----------------------------------------------------------------------

def vlb_grid(num_train_steps: int, steps: int | None = None) -> torch.Tensor:
    """Descending timesteps for the bound: all T (steps None or T), else `steps` evenly spaced from T-1 to 0.

    Both ends are kept: T-1 carries the prior term and 0 the decoder term (a grid ending above 0, such
    as "trailing", would leave L_0 at a noise level where it is far from −log p).
    """
    steps = num_train_steps if steps is None else steps
    if not 2 <= steps <= num_train_steps:
        raise ConfigError(f"the likelihood grid needs 2 to {num_train_steps} steps, got {steps}")
    # the "linspace" grid of sampling.grids, written out here: diffusion/ sits below sampling/
    return torch.linspace(num_train_steps - 1, 0, steps, dtype=torch.float64).round().long().unique().flip(0)


def reverse_variance(schedule: NoiseSchedule, t: int, t_prev: int, variance: str = "small") -> float:
    """σ² of p_θ(z_{t'} | z_t) for one (strided) step t -> t' ≥ 0: β̃ ("small") or β ("large")."""
    a_t, a_p = float(schedule.abar(t)), float(schedule.abar(t_prev))
    beta = 1 - a_t / a_p
    if variance == "small":
        return beta * (1 - a_p) / (1 - a_t)
    if variance == "large":
        return beta
    raise ConfigError(f"unknown reverse variance {variance!r}; choose one of {', '.join(VARIANCES)}")


def decoder_variance(schedule: NoiseSchedule, t: int) -> float:
    """σ̃²_t = (1-ᾱ_t)/ᾱ_t, the variance of p_θ(z_0 | z_t) in the last term L_0."""
    a = float(schedule.abar(t))
    return (1 - a) / a


def prior_kl(schedule: NoiseSchedule, z0: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """L_prior = KL(q(z_t | z_0) ‖ N(0, I)) at the top of the grid (default T-1), per sample, in nats."""
    t = schedule.num_steps - 1 if t is None else t
    a = float(schedule.abar(t))
    z0 = z0.double()
    kl = normal_kl(a**0.5 * z0, torch.tensor(1 - a, dtype=torch.float64), 0.0, torch.tensor(1.0, dtype=torch.float64))
    return kl.flatten(1).sum(1)


@dataclass
class VLBTerms:
    """The bound's terms per sample (nats, summed over latent dimensions, float64)."""

    ts: torch.Tensor  # (K,) the descending grid
    prior: torch.Tensor  # (B,) L_prior at ts[0]
    steps: torch.Tensor  # (K-1, B) L_k for the steps ts[i] -> ts[i+1]
    decoder: torch.Tensor  # (B,) L_0 = −log p_θ(z_0 | z_{ts[-1]})

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.steps.sum(0) + self.decoder


def vlb_terms(denoiser: DenoiserFn, schedule: NoiseSchedule, z0: torch.Tensor, ts: torch.Tensor | None = None, *,
              variance: str = "large", generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> VLBTerms:
    """Every term of the bound for the latents `z0` (B, …), one fresh z_t ~ q(z_t | z_0) per term.

    As improved DDPM's ``calc_bpd_loop``, each term is a one-sample estimate of its expectation over
    z_t, so their sum is an unbiased estimate of the bound. `dtype` is what the denoiser is fed.
    """
    ts = vlb_grid(schedule.num_steps) if ts is None else torch.as_tensor(ts, dtype=torch.long)
    if len(ts) < 1 or bool((ts[1:] >= ts[:-1]).any()) or int(ts[-1]) < 0 or int(ts[0]) >= schedule.num_steps:
        raise ConfigError("the likelihood grid must be strictly descending timesteps in 0…T-1")
    if variance not in VARIANCES:
        raise ConfigError(f"unknown reverse variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    z0 = z0.double()
    steps, decoder = [], None
    for i, t in enumerate(ts.tolist()):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        tt = torch.full((len(z0),), t, dtype=torch.long, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator, dtype=torch.float64, device=z0.device)
        zt = schedule.add_noise(z0, eps, tt)
        with torch.no_grad():
            x0_hat = denoiser(zt.to(dtype), tt).x0.double()
        if t_prev >= 0:
            tp = torch.full_like(tt, t_prev)
            mean_q, var_q = schedule.posterior(z0, zt, tt, tp)
            mean_p, _ = schedule.posterior(x0_hat, zt, tt, tp)
            var_p = torch.tensor(reverse_variance(schedule, t, t_prev, variance), dtype=torch.float64)
            steps.append(normal_kl(mean_q, var_q, mean_p, var_p).flatten(1).sum(1))
        else:
            var0 = torch.tensor(decoder_variance(schedule, t), dtype=torch.float64)
            decoder = gaussian_nll(z0, x0_hat, var0).flatten(1).sum(1)
    stacked = torch.stack(steps) if steps else z0.new_zeros((0, len(z0)))
    return VLBTerms(ts, prior_kl(schedule, z0, int(ts[0])), stacked, decoder)


# --- the probability-flow ODE -------------------------------------------------------------------

def flow_nodes(schedule: NoiseSchedule, steps: int | None = None) -> torch.Tensor:
    """Integer timesteps 0 = u_0 < u_1 < … < u_{2M} for `steps` = M RK4 steps of even length (default T/2 - 1).

    Each step's midpoint is an integer timestep, so the denoiser is only ever asked about the
    timesteps it was trained on; the last node is the largest even timestep ≤ T-1.
    """
    top = (schedule.num_steps - 1) // 2  # number of length-2 steps that fit
    steps = top if steps is None else steps
    if not 1 <= steps <= top:
        raise ConfigError(f"the ODE needs 1 to {top} steps, got {steps}")
    half = torch.linspace(0, top, steps + 1, dtype=torch.float64).round().long()  # ends of steps, in half-units
    nodes = torch.empty(2 * steps + 1, dtype=torch.long)
    nodes[0::2], nodes[1::2] = 2 * half, half[:-1] + half[1:]  # step [2h_j, 2h_{j+1}] has midpoint h_j + h_{j+1}
    return nodes


def _probe(x: torch.Tensor, kind: str, generator) -> torch.Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
    if kind == "gaussian":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    raise ConfigError(f"unknown trace probe {kind!r}; choose one of {', '.join(PROBES)}")


def _field(denoiser, schedule, x, u: int, probes, dtype):
    """(x̃ − D)/2 and div_x̃ of (x̃ − D) at timestep u: dx̃/dv = first/v, d(div)/dv = second/v.

    The divergence is exact (one VJP per dimension) when `probes` is None, else Hutchinson's
    E[εᵀ (∂g/∂x̃) ε] averaged over the given probes (Song et al. 2021, App. D.2).
    """
    a = float(schedule.abar(u)) ** 0.5
    tt = torch.full((len(x),), u, dtype=torch.long, device=x.device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        d = denoiser((a * x).to(dtype), tt).x0.double()  # D(x̃) = x̂0(z_t = √ᾱ x̃)
        g = x - d
        dims = x[0].numel()
        vecs = probes if probes is not None else [None] * dims
        div = x.new_zeros(len(x))
        for k, eps in enumerate(vecs):
            if eps is None:  # the k-th basis vector: the exact trace, one row of the Jacobian at a time
                eps = torch.zeros_like(x).flatten(1)
                eps[:, k] = 1
                eps = eps.view_as(x)
            (jt_eps,) = torch.autograd.grad(g, x, eps, retain_graph=k + 1 < len(vecs))
            div = div + (jt_eps * eps).flatten(1).sum(1)
        if probes is not None:
            div = div / len(probes)
    return g.detach() / 2, div / 2


def flow_log_likelihood(denoiser: DenoiserFn, schedule: NoiseSchedule, z0: torch.Tensor, *, steps: int | None = None,
                        n_probes: int | None = 1, probe: str = "rademacher", generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(z_0) per sample (nats, float64) from the probability-flow ODE, by RK4 in float64.

    The ODE runs in x̃ from the smallest noise level, v_0 = σ̃²_0, to the node nearest T-1, starting at
    x̃ = z_0: so this is log of p_data ∗ N(0, v_0 I) at z_0, which differs from log p_data(z_0) by
    O(v_0) per dimension (v_0 ≈ 1e-4 for the linear schedule). The time variable is the timestep u,
    with v(u) the quadratic through each step's three nodes, so the denoiser sees only integer
    timesteps and the step's quadrature of dv/du is exact. `n_probes` Hutchinson probes (fixed for
    the whole solve, as in FFJORD) estimate the divergence, or None computes it exactly (for small
    latents: one backward pass per dimension).
    """
    nodes = flow_nodes(schedule, steps)
    x = z0.double()
    probes = None
    if n_probes is not None:
        if n_probes < 1:
            raise ConfigError(f"the Hutchinson estimator needs at least one probe, got {n_probes}")
        probes = [_probe(x, probe, generator) for _ in range(n_probes)]
    v = ((1 - schedule.abar(nodes)) / schedule.abar(nodes)).tolist()
    delta = x.new_zeros(len(x))  # ∫ div dv so far
    for j in range(0, len(nodes) - 1, 2):
        u0, um, u1 = nodes[j].item(), nodes[j + 1].item(), nodes[j + 2].item()
        h = u1 - u0
        v0, vm, v1 = v[j], v[j + 1], v[j + 2]
        # dv/du of the quadratic through (u0, v0), (um, vm), (u1, v1), at the three nodes
        dv0, dvm, dv1 = (-3 * v0 + 4 * vm - v1) / h, (v1 - v0) / h, (v0 - 4 * vm + 3 * v1) / h

        def f(xs, u, vv, dv):
            g, div = _field(denoiser, schedule, xs, u, probes, dtype)
            return g * (dv / vv), div * (dv / vv)

        k1, l1 = f(x, u0, v0, dv0)
        k2, l2 = f(x + h / 2 * k1, um, vm, dvm)
        k3, l3 = f(x + h / 2 * k2, um, vm, dvm)
        k4, l4 = f(x + h * k3, u1, v1, dv1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    a_end = float(schedule.abar(nodes[-1]))
    # p_T(x̃) from z_T = √ᾱ x̃ ~ N(0, I): the density picks up the Jacobian √ᾱ per dimension
    log_p_end = (-gaussian_nll(a_end**0.5 * x, 0.0, torch.tensor(1.0, dtype=torch.float64))).flatten(1).sum(1)
    log_p_end = log_p_end + 0.5 * math.log(a_end) * x[0].numel()
    # along the path d log p/du = −div(dx̃/du), so log p_0(x̃_0) = log p_T(x̃_T) + ∫ div(dx̃/du) du
    return log_p_end + delta
