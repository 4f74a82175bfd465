"""Samplers driven by the exact denoiser for Gaussian data must reproduce the data distribution.

For x0 ~ N(μ, s²) and x_t = a x0 + σ ε (a = sqrt(ᾱ_t), σ = sqrt(1-ᾱ_t)), the posterior mean is
E[x0 | x_t] = μ + a s² / (a² s² + σ²) · (x_t - a μ), which is the optimal (MSE) denoiser.
"""

import itertools
import math

import pytest
import torch

from latentdiff import guidance
from latentdiff.cli import main as cli
from latentdiff.cli import options
from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Prediction, prediction_from_output
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError
from latentdiff.sampling import samplers
from latentdiff.sampling.grids import ALL_SPACINGS, karras_sigmas, timesteps

MU, S_DATA = 0.8, 0.35


def gaussian_denoiser(schedule, mu=MU, s=S_DATA, kind="x0"):
    def fn(xt, t):
        abar = schedule.abar(t).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
        a, var = abar.sqrt(), 1 - abar
        x0 = mu + a * s**2 / (a**2 * s**2 + var) * (xt - a * mu)
        if kind == "x0":
            return prediction_from_output(x0, xt, schedule.abar(t), "x0")
        eps = (xt - a * x0) / var.sqrt()
        if kind == "eps":
            return prediction_from_output(eps, xt, schedule.abar(t), "eps")
        v = a * eps - var.sqrt() * x0
        return prediction_from_output(v, xt, schedule.abar(t), "v")
    return fn


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.create("linear", 1000)


def _draw(sched, sampler, steps, n=20_000, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    ts = timesteps(1000, steps, kw.pop("spacing", "trailing"), sched)
    return samplers.SAMPLERS[sampler](gaussian_denoiser(sched, kind=kw.pop("kind", "x0")), x, sched, ts,
                                      generator=g, **kw)


# Few steps lose variance for this narrow (s < 1) distribution: ancestral steps drop the
# Var[x0|x_t] term of the true reverse kernel (O(β²) per step) and DDIM's Euler-like update
# under-shoots near t = 0. So the tolerance tightens as the step count grows.
@pytest.mark.parametrize("sampler,steps,kw,rel", [
    ("ddpm", 1000, {}, 0.015),
    ("ddpm", 250, {}, 0.05),
    ("ddim", 250, {}, 0.015),
    ("ddim", 100, {"kind": "v"}, 0.05),
    ("ddim", 250, {"eta": 1.0}, 0.05),
    ("ddim", 250, {"eta": 0.5, "kind": "eps"}, 0.03),
    # the new samplers at a moderate step count, on the default grid and on Karras σ; the ODE samplers'
    # precision is checked against the exact ODE below, here the 20k draws themselves are ±1% off
    ("euler", 100, {}, 0.04),
    ("euler", 100, {"spacing": "karras", "kind": "eps"}, 0.04),
    ("heun", 50, {}, 0.025),
    ("heun", 50, {"spacing": "karras", "kind": "v"}, 0.025),
    ("dpmpp-2m", 50, {}, 0.025),
    ("dpmpp-2m", 50, {"spacing": "karras", "kind": "eps"}, 0.025),
    ("unipc", 50, {}, 0.025),
    ("unipc", 50, {"spacing": "karras", "kind": "v"}, 0.025),
    ("dpmpp-2m-sde", 100, {"spacing": "karras"}, 0.025),
    ("dpmpp-2m-sde", 250, {"kind": "eps"}, 0.025),
])
def test_sampler_reproduces_gaussian(sched, sampler, steps, kw, rel):
    x = _draw(sched, sampler, steps, **kw)
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S_DATA, rel=rel)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not(sched):
    a = _draw(sched, "ddim", 10, n=8)
    b = _draw(sched, "ddim", 10, n=8)
    torch.testing.assert_close(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x = torch.zeros(8, 1, 1, 1, dtype=torch.float64)
    ts = timesteps(1000, 10)
    r1 = samplers.ddpm(gaussian_denoiser(sched), x, sched, ts, generator=g1)
    r2 = samplers.ddpm(gaussian_denoiser(sched), x, sched, ts, generator=g2)
    assert not torch.allclose(r1, r2)


def test_wrong_data_mean_would_be_caught(sched):
    """Guard against a vacuous test: a denoiser for another mean gives another mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = samplers.ddim(gaussian_denoiser(sched, mu=-0.5), x, sched, timesteps(1000, 20))
    assert abs(out.mean().item() - MU) > 0.5


def test_ddim_inversion_round_trip(sched):
    """Inverting with the exact denoiser and regenerating returns the start point."""
    g = torch.Generator().manual_seed(3)
    x0 = MU + S_DATA * torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64)
    den = gaussian_denoiser(sched)
    errors = []
    for steps in (50, 1000):  # first-order error: it shrinks with the step size
        ts = timesteps(1000, steps)
        back = samplers.ddim(den, samplers.ddim_invert(den, x0, sched, ts), sched, ts)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.015 and errors[1] < errors[0] / 5


def test_ddim_equals_euler_in_sigma_space(sched):
    """DDIM(η=0) is Euler's method on dx̄/dσ̄ = ε̂ with x̄ = x/sqrt(ᾱ), σ̄ = sqrt((1-ᾱ)/ᾱ) (Karras et al. 2022)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1, 1, 1, generator=g, dtype=torch.float64)
    ts = timesteps(1000, 8)
    den = gaussian_denoiser(sched)
    out = samplers.ddim(den, x, sched, ts)
    sig = lambda t: ((1 - sched.abar(t)) / sched.abar(t)).sqrt().item()  # noqa: E731
    xbar = x / sched.abar(int(ts[0])).sqrt().item()
    for i, t in enumerate(ts.tolist()):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        a = sched.abar(t).item()
        eps = den(xbar * a**0.5, torch.full((16,), t)).eps
        xbar = xbar + (sig(t_prev) - sig(t)) * eps
    torch.testing.assert_close(out, xbar, rtol=1e-10, atol=1e-10)


def test_callback_and_unknown_sampler(sched):
    seen = []
    x = torch.randn(2, 1, 1, 1, dtype=torch.float64)
    samplers.sample(gaussian_denoiser(sched), x, sched, sampler="ddim", steps=5,
                    callback=lambda i, n, x0: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]
    with pytest.raises(Exception, match="unknown sampler"):
        samplers.sample(gaussian_denoiser(sched), x, sched, sampler="nope", steps=5)
    with pytest.raises(Exception, match="eta"):
        samplers.ddim(gaussian_denoiser(sched), x, sched, timesteps(1000, 5), eta=2.0)


def test_prediction_tuple():
    p = Prediction(torch.zeros(1), torch.ones(1))
    assert p.x0.item() == 0 and p.eps.item() == 1


# --- the few-step samplers against the exact probability-flow ODE -----------------------------------
# For x0 ~ N(μ, s²), in x̃ = x/sqrt(ᾱ) with σ̃ = sqrt((1-ᾱ)/ᾱ) the ODE dx̃/dσ̃ = (x̃ - D(x̃))/σ̃ becomes
# dx̃/dσ̃ = (x̃ - μ) σ̃/(s² + σ̃²), so x̃ - μ ∝ sqrt(s² + σ̃²): the start point maps linearly to its end,
# x0 = μ + (x_T/sqrt(ᾱ_T) - μ) · s / sqrt(s² + σ̃_T²). Every discrete grid integrates this same ODE.

# steps at which a sampler gets the 20k-draw std within 6% (first-order ones need many more)
MODERATE_STEPS = {"ddpm": 500, "ddim": 250, "euler": 250}


def ode_solution(sched, x, t_start):
    abar = sched.abar(t_start).item()
    sig = math.sqrt((1 - abar) / abar)
    return MU + (x / math.sqrt(abar) - MU) * S_DATA / math.sqrt(S_DATA**2 + sig**2)


def _ode_error(sched, sampler, steps, spacing="karras"):
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(-1, 1, 1, 1)
    ts = timesteps(1000, steps, spacing, sched)
    out = samplers.SAMPLERS[sampler](gaussian_denoiser(sched), x, sched, ts)
    return (out - ode_solution(sched, x, int(ts[0]))).abs().max().item()


@pytest.mark.parametrize("sampler,order_ratio", [
    ("ddim", (1.6, 2.4)), ("euler", (1.6, 2.4)),  # first order: halving the step halves the error
    ("heun", (3.2, 8)), ("dpmpp-2m", (3.2, 8)),   # second order: about a quarter
    ("unipc", (5, 16)),                           # UniP-2 + UniC: the corrector adds one order (Zhao et al. 2023)
])
def test_ode_samplers_converge_at_their_order(sched, sampler, order_ratio):
    """Error against the exact ODE solution on Karras grids of 16, 32 and 64 steps: decreasing, at the
    rate of the method's order. A sign or index error in a higher-order term drops the rate to ~2 or below."""
    errors = [_ode_error(sched, sampler, steps) for steps in (16, 32, 64)]
    assert errors[0] > errors[1] > errors[2]
    low, high = order_ratio
    for coarse, fine in itertools.pairwise(errors):
        assert low < coarse / fine < high, errors
    assert errors[2] < {"ddim": 0.08, "euler": 0.08}.get(sampler, 0.01)


def test_second_order_samplers_beat_first_order_at_few_steps(sched):
    """At 10 steps on Karras σ the multistep solvers are several times closer to the ODE than DDIM/Euler."""
    first = _ode_error(sched, "ddim", 10)
    assert _ode_error(sched, "euler", 10) == pytest.approx(first, rel=1e-9)  # DDIM(η=0) is Euler in σ̃-space
    for name in ("dpmpp-2m", "unipc"):
        assert _ode_error(sched, name, 10) < first / 2.5, name
    # on the default (trailing) grid the last, first-order step dominates, but they still win
    for name in ("dpmpp-2m", "unipc", "heun"):
        assert _ode_error(sched, name, 10, "trailing") < _ode_error(sched, "ddim", 10, "trailing"), name


def test_dpmpp_2m_matches_the_paper_update_by_hand(sched):
    """Two steps of DPM-Solver++(2M) written out from Lu et al. 2022b, Algorithm 2, in float64."""
    x = torch.tensor([[[[1.3]]], [[[-0.4]]]], dtype=torch.float64)
    ts = torch.tensor([700, 300, 100])
    den = gaussian_denoiser(sched)
    out = samplers.dpmpp_2m(den, x, sched, ts)
    a = {t: sched.abar(t).item() ** 0.5 for t in (700, 300, 100, -1)}
    s = {t: (1 - a[t] ** 2) ** 0.5 for t in a}
    lam = {t: math.log(a[t] / s[t]) for t in (700, 300, 100)}
    m0 = den(x, torch.full((2,), 700)).x0
    x1 = s[300] / s[700] * x - a[300] * (math.exp(-(lam[300] - lam[700])) - 1) * m0
    m1 = den(x1, torch.full((2,), 300)).x0
    h, r = lam[100] - lam[300], (lam[300] - lam[700]) / (lam[100] - lam[300])
    d = (1 + 1 / (2 * r)) * m1 - 1 / (2 * r) * m0
    x2 = s[100] / s[300] * x1 - a[100] * (math.exp(-h) - 1) * d
    x3 = den(x2, torch.full((2,), 100)).x0  # the last step to σ = 0 is first order: x̂0 itself
    torch.testing.assert_close(out, x3, rtol=1e-12, atol=1e-12)


def test_heun_matches_karras_algorithm_by_hand(sched):
    """Karras et al. 2022 Alg. 1 over σ̃ = (σ̃_700, σ̃_200, 0), in float64: one corrected step, one Euler step."""
    x = torch.tensor([[[[0.9]]], [[[-1.7]]]], dtype=torch.float64)
    den = gaussian_denoiser(sched)
    out = samplers.heun(den, x, sched, torch.tensor([700, 200]))
    ab = {t: sched.abar(t).item() for t in (700, 200)}
    sig = {t: math.sqrt((1 - ab[t]) / ab[t]) for t in ab}

    def d(xt, t):  # (x̃ - D(x̃; σ̃)) / σ̃, with D evaluated through the VP network input
        return (xt - den(xt * math.sqrt(ab[t]), torch.full((2,), t)).x0) / sig[t]

    xt = x / math.sqrt(ab[700])
    d1 = d(xt, 700)
    x_e = xt + (sig[200] - sig[700]) * d1
    xt = xt + (sig[200] - sig[700]) * 0.5 * (d1 + d(x_e, 200))
    xt = xt + (0 - sig[200]) * d(xt, 200)
    torch.testing.assert_close(out, xt, rtol=1e-10, atol=1e-10)


def test_sde_sampler_is_seeded_and_stochastic(sched):
    x = torch.zeros(8, 1, 1, 1, dtype=torch.float64)
    ts = timesteps(1000, 10)

    def run(seed):
        return samplers.dpmpp_2m_sde(gaussian_denoiser(sched), x, sched, ts, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert run(1).std() > 0.1  # the same start point spreads out: it samples, it does not follow one path


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_deterministic_samplers_draw_no_noise(sched, sampler):
    x = torch.randn(4, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(1000, 6)
    g = torch.Generator().manual_seed(9)
    before = g.get_state()
    samplers.SAMPLERS[sampler](gaussian_denoiser(sched), x, sched, ts, generator=g)
    drew = not torch.equal(before, g.get_state())
    assert drew == (sampler in ("ddpm", "dpmpp-2m-sde"))  # matches the module docstring's list


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_works_with_guidance(sched, sampler):
    """guidance.blend of two exact denoisers (means μ_a, μ_b) is the exact denoiser of N((1-w)μ_a + w μ_b, s²),
    since x̂0 is affine in μ: every sampler must then land on the blended mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    fn = guidance.blend(gaussian_denoiser(sched, mu=-1.0), gaussian_denoiser(sched, mu=1.0), 0.75)
    out = samplers.SAMPLERS[sampler](fn, x, sched, timesteps(1000, MODERATE_STEPS.get(sampler, 50)), generator=g)
    assert out.mean().item() == pytest.approx(0.5, abs=0.015)
    assert out.std().item() == pytest.approx(S_DATA, rel=0.06)


def test_samplers_with_classifier_free_guidance_on_a_network():
    """The real guidance wrapper (one batched call per evaluation) runs through every sampler and equals
    guiding by hand with two separate calls, x̂ = x̂_u + w (x̂_c - x̂_u); at scale 1 it is the conditional model."""
    from latentdiff.pipeline import LatentDiffusion
    from latentdiff.pipeline.config import load_config

    cfg = load_config(preset="tiny", overrides=["unet.num_classes=3"])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), ("a", "b", "c")).eval()
    for p in pipe.denoiser.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    noise = torch.randn(3, *pipe.autoencoder.latent_shape, generator=torch.Generator().manual_seed(1))
    labels, w = torch.tensor([0, 1, 2]), 2.5
    cond_fn, unc_fn = pipe.denoiser.bind(Cond(labels=labels)), pipe.denoiser.bind(None)

    def by_hand(xt, t):
        c, u = cond_fn(xt, t), unc_fn(xt, t)
        return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))

    sched = pipe.denoiser.schedule
    for name in samplers.SAMPLERS:
        def run(fn, name=name):
            return samplers.sample(fn, noise, sched, sampler=name, steps=4, generator=torch.Generator().manual_seed(2))
        guided = run(guidance.classifier_free(pipe.denoiser, Cond(labels=labels), w))
        assert torch.isfinite(guided).all(), name
        torch.testing.assert_close(guided, run(by_hand), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run(guidance.classifier_free(pipe.denoiser, Cond(labels=labels), 1.0)), run(cond_fn))


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_zero_terminal_snr_start(sampler, spacing):
    """With ᾱ_{T-1} = 0 (σ̃ = ∞, λ = -∞ at the first point) every sampler stays finite and still samples the data."""
    sched = NoiseSchedule.create("linear", 1000, zero_terminal_snr=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    steps = MODERATE_STEPS.get(sampler, 100)
    out = samplers.sample(gaussian_denoiser(sched, kind="v"), x, sched, sampler=sampler, steps=steps,
                          spacing=spacing, generator=g)
    assert torch.isfinite(out).all()
    assert out.mean().item() == pytest.approx(MU, abs=0.015)
    assert out.std().item() == pytest.approx(S_DATA, rel=0.06)


# --- network evaluations --------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("steps,spacing", [(1, "trailing"), (2, "trailing"), (7, "trailing"), (12, "karras")])
def test_nfe_counts_real_network_calls(sched, sampler, steps, spacing):
    calls = []
    den = gaussian_denoiser(sched)

    def counting(xt, t):
        calls.append(int(t[0]))
        return den(xt, t)

    ts = timesteps(1000, steps, spacing, sched)
    x = torch.randn(3, 1, 1, 1, dtype=torch.float64)
    samplers.SAMPLERS[sampler](counting, x, sched, ts, generator=torch.Generator().manual_seed(0))
    assert len(calls) == samplers.nfe(sampler, len(ts))
    assert set(calls) <= set(ts.tolist())  # evaluated only on the grid, never at t = -1
    n = samplers.nfe(sampler, steps)
    assert samplers.nfe(sampler, samplers.steps_for_nfe(sampler, n)) == n
    assert samplers.nfe(sampler, samplers.steps_for_nfe(sampler, n + 1)) <= n + 1


def test_nfe_values_and_errors():
    assert samplers.nfe("heun", 10) == 19 and samplers.steps_for_nfe("heun", 20) == 10
    assert samplers.nfe("dpmpp-2m", 10) == 10 and samplers.steps_for_nfe("unipc", 10) == 10
    with pytest.raises(ConfigError, match="unknown sampler"):
        samplers.nfe("lms", 10)
    with pytest.raises(ConfigError, match="NFE budget"):
        samplers.steps_for_nfe("heun", 0)


# --- Karras timestep grids ------------------------------------------------------------------------

def test_karras_sigmas_formula():
    s = karras_sigmas(0.01, 100.0, 5)
    assert s[0].item() == pytest.approx(100.0) and s[-1].item() == pytest.approx(0.01)
    ramp = [(100 ** (1 / 7) + i / 4 * (0.01 ** (1 / 7) - 100 ** (1 / 7))) ** 7 for i in range(5)]
    assert s.tolist() == pytest.approx(ramp, rel=1e-12)
    assert karras_sigmas(0.01, 100.0, 1).tolist() == [100.0]


@pytest.mark.parametrize("kind,T", [("linear", 1000), ("cosine", 1000), ("scaled-linear", 50)])
@pytest.mark.parametrize("steps", [1, 4, 10, 30, 200])
def test_karras_timesteps_against_brute_force(kind, T, steps):
    steps = min(steps, T)
    sched = NoiseSchedule.create(kind, T)
    ts = timesteps(T, steps, "karras", sched)
    ab = sched.alpha_bar
    log_sig = [0.5 * math.log((1 - a) / a) for a in ab.tolist()]
    smin, smax = math.exp(log_sig[0]), math.exp(log_sig[-1])
    expected = []
    for i in range(steps):
        frac = i / (steps - 1) if steps > 1 else 0.0
        target = math.log((smax ** (1 / 7) + frac * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7)
        t = min(range(T), key=lambda k: (abs(log_sig[k] - target), k))
        if t not in expected:
            expected.append(t)
    assert ts.tolist() == expected
    assert ts[0] == T - 1 and (steps == 1 or ts[-1] == 0)
    assert bool((ts[1:] < ts[:-1]).all()) and ts.dtype == torch.long
    assert 1 <= len(ts) <= steps


def test_karras_grid_is_denser_at_low_noise_and_needs_the_schedule(sched):
    ts = timesteps(1000, 20, "karras", sched)
    assert len(ts) == 20
    gaps = (ts[:-1] - ts[1:]).tolist()
    assert gaps[0] > gaps[-1]  # big steps at high noise, small near the data: ρ = 7 concentrates there
    assert len(timesteps(1000, 1000, "karras", sched)) < 1000  # duplicates near t = 0 are dropped
    with pytest.raises(ConfigError, match="needs the noise schedule"):
        timesteps(1000, 10, "karras")
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        samplers.sample(gaussian_denoiser(sched), torch.zeros(1, 1, 1, 1), sched, spacing="quadratic")
    zsnr = NoiseSchedule.create("linear", 1000, zero_terminal_snr=True)
    tz = timesteps(1000, 10, "karras", zsnr)
    assert tz[0] == 999 and len(tz) == 10 and bool((tz[1:] < tz[:-1]).all())


def test_uniform_is_linspace():
    assert timesteps(1000, 13, "uniform").tolist() == timesteps(1000, 13, "linspace").tolist()


# --- CLI options ----------------------------------------------------------------------------------

def _parse(argv: list[str]) -> dict:
    """The option values `latentdiff ARGV` would run its command with."""
    command = cli.cli.get_command(None, argv[0])
    return command.make_context(argv[0], argv[1:]).params


def test_cli_offers_every_sampler_and_spacing():
    for name in samplers.SAMPLERS:
        for spacing in ALL_SPACINGS:
            for command in ("sample", "eval"):
                params = _parse([command, "--model", "m", "--sampler", name, "--spacing", spacing])
                assert (params["sampler"], params["spacing"]) == (name, spacing)
    assert _parse(["sample", "--model", "m", "--compile"])["compile"] == "default"
    assert _parse(["sample", "--model", "m", "--compile", "reduce-overhead"])["compile"] == "reduce-overhead"
    assert _parse(["sample", "--model", "m"])["compile"] is None
    assert set(options.SAMPLERS.choices) == set(samplers.SAMPLERS)


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "m", "--sampler", "dpmpp-3m"], "--sampler: invalid choice: 'dpmpp-3m'"),
    (["sample", "--model", "m", "--spacing", "cubic"], "--spacing: invalid choice: 'cubic'"),
    (["eval", "--model", "m", "--spacing", "Karras"], "--spacing: invalid choice: 'Karras'"),
])
def test_cli_bad_sampler_or_spacing_exits_2_with_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("latentdiff: error:") and needle in err[0], err


def test_cli_sample_with_a_new_sampler_and_spacing(tmp_path, capsys):
    """End to end through `latentdiff sample` on a saved tiny model; the grid's metadata records the choice."""
    import json

    from PIL import Image

    from latentdiff.pipeline import LatentDiffusion
    from latentdiff.pipeline.config import load_config

    torch.manual_seed(0)
    pipe = LatentDiffusion.build(load_config(preset="tiny"), (28, 28), tuple("abcdefghij")).eval()
    pipe.save(tmp_path / "m")
    out = tmp_path / "s.png"
    assert cli.main(["sample", "--model", str(tmp_path / "m"), "--n", "4", "--steps", "3", "--sampler", "unipc",
                     "--spacing", "karras", "--out", str(out), "--no-progress", "--device", "cpu"]) in (0, None)
    meta = json.loads(Image.open(out).text["latentdiff"])
    assert (meta["sampler"], meta["spacing"], meta["steps"]) == ("unipc", "karras", 3)
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        pipe.generate(2, steps=3, spacing="cosine")
