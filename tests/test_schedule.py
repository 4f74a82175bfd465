"""Noise-schedule maths against float64 references and the one-step process."""

import math

import pytest
import torch

from latentdiff.diffusion import schedule as S
from latentdiff.errors import ConfigError
from latentdiff.sampling import grids as G


@pytest.mark.parametrize("kind", S.SCHEDULES)
def test_alpha_bar_monotone_in_unit_interval(kind):
    sched = S.NoiseSchedule.create(kind, 1000)
    a = sched.alpha_bar
    assert a.dtype == torch.float64
    assert bool(((a > 0) & (a < 1)).all())
    assert bool((a[1:] < a[:-1]).all())
    assert a[0] > 0.99 and a[-1] < 0.01


def test_linear_betas_match_ddpm():
    sched = S.NoiseSchedule.create("linear", 1000)
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # ᾱ_t is the running product of (1 - β): check one index by hand, in float64
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(501))
    assert sched.alpha_bar[500].item() == pytest.approx(expected, rel=1e-12)


def test_cosine_matches_closed_form():
    sched = S.NoiseSchedule.create("cosine", 1000)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # β is unclipped there, so ᾱ_t = f(t+1)/f(0) exactly
        assert sched.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_zero_terminal_snr():
    sched = S.NoiseSchedule.create("linear", 1000, zero_terminal_snr=True)
    assert sched.alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)
    base = S.NoiseSchedule.create("linear", 1000)
    assert sched.alpha_bar[0].item() == pytest.approx(base.alpha_bar[0].item(), rel=1e-9)


def test_closed_form_matches_iterated_one_step_process():
    """q(x_t|x_0) in closed form vs applying q(x_s|x_{s-1}) t times: same mean and variance."""
    sched = S.NoiseSchedule.create("linear", 200, beta_start=1e-3, beta_end=0.05)
    g = torch.Generator().manual_seed(0)
    n, x0_value = 200_000, 1.5
    x = torch.full((n, 1), x0_value, dtype=torch.float64)
    for t in range(120):  # 0-based: after applying steps 0…t we hold x_t
        x = sched.step_noise(x, torch.randn(x.shape, generator=g, dtype=torch.float64), torch.full((n,), t))
    abar = sched.alpha_bar[119].item()
    assert x.mean().item() == pytest.approx(math.sqrt(abar) * x0_value, abs=0.01)
    assert x.var().item() == pytest.approx(1 - abar, rel=0.01)
    direct = sched.add_noise(torch.full((n, 1), x0_value, dtype=torch.float64),
                             torch.randn((n, 1), generator=g, dtype=torch.float64), torch.full((n,), 119))
    assert direct.mean().item() == pytest.approx(x.mean().item(), abs=0.01)
    assert direct.var().item() == pytest.approx(x.var().item(), rel=0.02)


def test_abar_minus_one_is_clean():
    sched = S.NoiseSchedule.create("linear", 10)
    assert sched.abar(-1).item() == 1.0
    assert sched.abar(torch.tensor([0, 9])).tolist() == sched.alpha_bar[[0, 9]].tolist()


def test_posterior_matches_bayes_rule_float64():
    """q(x_{t-1}|x_t, x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): compare with the product of Gaussians."""
    sched = S.NoiseSchedule.create("linear", 1000)
    t = torch.tensor([300])
    x0 = torch.tensor([[0.7]], dtype=torch.float64)
    xt = torch.tensor([[-0.4]], dtype=torch.float64)
    mean, var = sched.posterior(x0, xt, t, t - 1)
    beta, abar_prev = sched.betas[300].item(), sched.alpha_bar[299].item()
    # prior on x_{t-1}: N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1}); likelihood of x_t: N(sqrt(1-β) x_{t-1}, β)
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    m = (math.sqrt(abar_prev) * 0.7 / (1 - abar_prev) + math.sqrt(1 - beta) * -0.4 / beta) / prec
    assert var.item() == pytest.approx(1 / prec, rel=1e-9)
    assert mean.item() == pytest.approx(m, rel=1e-9)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_parameterisation_conversions_invert(t):
    sched = S.NoiseSchedule.create("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    tt = torch.full((4,), t)
    abar = sched.abar(tt)
    xt = sched.add_noise(x0, eps, tt)
    v = S.v_target(x0, eps, abar)
    torch.testing.assert_close(S.eps_to_x0(xt, eps, abar), x0, rtol=1e-6, atol=1e-6 / max(abar[0].item(), 1e-3))
    torch.testing.assert_close(S.x0_to_eps(xt, x0, abar), eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S.v_to_x0(xt, v, abar), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S.v_to_eps(xt, v, abar), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spacing", G.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timestep_grids(spacing, steps):
    ts = G.timesteps(1000, steps, spacing)
    assert ts.dtype == torch.long
    assert len(ts) == steps
    assert bool((ts[1:] < ts[:-1]).all())  # strictly descending
    assert ts.min() >= 0 and ts.max() <= 999
    if spacing in ("trailing", "linspace"):
        assert ts[0] == 999
    if steps == 1000:
        assert ts.tolist() == list(range(999, -1, -1))


def test_bad_schedule_inputs():
    with pytest.raises(ConfigError, match="unknown noise schedule"):
        S.NoiseSchedule.create("quadratic")
    with pytest.raises(ConfigError, match="between 1 and"):
        G.timesteps(1000, 0)
    with pytest.raises(ConfigError, match="between 1 and"):
        G.timesteps(1000, 1001)
