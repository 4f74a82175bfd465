"""Likelihood: Gaussian terms against float64 references, the VLB and the probability-flow ODE against the
exact log-density of Gaussian data under its ideal denoiser, the codec's Jacobian, units, and the
whole-model estimate on a tiny model."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from latentdiff.diffusion import likelihood as L
from latentdiff.diffusion.denoiser import Prediction
from latentdiff.diffusion.schedule import NoiseSchedule, x0_to_eps
from latentdiff.errors import ConfigError
from latentdiff.evaluation import likelihood as E

F64 = torch.float64


def ideal_denoiser(schedule, mu, cov):
    """x̂0 = E[z_0 | z_t] for z_0 ~ N(mu, cov) (cov a full d×d matrix), z_t = a z_0 + s ε: exact, in float64."""
    eye = torch.eye(len(mu), dtype=F64)

    def fn(zt, t):
        abar = schedule.abar(t)
        a2 = float(abar[0])  # one timestep per call, as the estimators call it
        gain = math.sqrt(a2) * cov @ torch.linalg.inv(a2 * cov + (1 - a2) * eye)  # Cov(z0, zt) Var(zt)^-1
        x0 = mu + (zt.double() - math.sqrt(a2) * mu) @ gain.T
        return Prediction(x0, x0_to_eps(zt.double(), x0, abar))

    return fn


def true_nll(z0, mu, cov):
    return -torch.distributions.MultivariateNormal(mu, cov).log_prob(z0)


@pytest.fixture(scope="module")
def gaussian():
    """2-D Gaussian data, a T = 200 linear schedule (β scaled ×5 so ᾱ_T ≈ 0) and 10,000 samples."""
    sched = NoiseSchedule.create("linear", 200, beta_start=5e-4, beta_end=0.1)
    mu = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[0.49, 0.0], [0.0, 0.49]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    z0 = mu + torch.randn(10_000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    return sched, mu, cov, z0, true_nll(z0, mu, cov)


# --- closed-form terms ---------------------------------------------------------------------------

def test_normal_kl_against_quadrature():
    x = torch.linspace(-30, 30, 400_001, dtype=F64)
    for m1, v1, m2, v2 in ((0.0, 1.0, 1.0, 4.0), (2.0, 0.25, -1.0, 0.5), (0.3, 3.0, 0.3, 3.0)):
        p, q = stats.norm(m1, v1**0.5), stats.norm(m2, v2**0.5)
        ref = torch.trapezoid(torch.from_numpy(p.pdf(x.numpy()) * (p.logpdf(x.numpy()) - q.logpdf(x.numpy()))), x)
        got = L.normal_kl(torch.tensor(m1, dtype=F64), torch.tensor(v1, dtype=F64), m2, torch.tensor(v2, dtype=F64))
        assert float(got) == pytest.approx(float(ref), abs=1e-9)
    assert float(L.normal_kl(torch.tensor(0.0), torch.tensor(1.0), 1.0, torch.tensor(4.0))) == pytest.approx(
        0.5 * (math.log(4) + 2 / 4 - 1), rel=1e-6)  # KL(N(0,1) ‖ N(1,4)), by hand


def test_gaussian_nll_and_entropy_against_scipy():
    x, m, v = torch.tensor([0.3, -2.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.2, 3.0], dtype=F64)
    assert torch.allclose(L.gaussian_nll(x, m, v), -torch.from_numpy(stats.norm(m, v.sqrt()).logpdf(x)), atol=1e-12)
    ent = L.gaussian_entropy(torch.log(v))
    assert torch.allclose(ent, torch.from_numpy(stats.norm(0, v.sqrt()).entropy()), atol=1e-12)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=F64) / 127.5 - 1  # x = k/127.5 - 1
    for mean, scale in ((0.1, 0.05), (-1.2, 0.01), (0.99, 0.3), (0.0, 1e-3)):
        nll = L.discretized_gaussian_nll(levels, torch.tensor(mean, dtype=F64), torch.tensor(scale, dtype=F64))
        assert torch.isfinite(nll).all() and (nll >= 0).all()
        assert float(torch.logsumexp(-nll, 0)) == pytest.approx(0.0, abs=1e-9)  # P sums to one
        # an interior bin against scipy's CDF difference; the edge bins are open
        k = 130
        d = stats.norm(mean, scale)
        lo, hi = float(levels[k]) - 1 / 255, float(levels[k]) + 1 / 255
        ref = d.sf(lo) - d.sf(hi) if lo > mean else d.cdf(hi) - d.cdf(lo)  # scipy's small tail, no cancellation
        assert math.exp(-float(nll[k])) == pytest.approx(ref, rel=1e-6, abs=1e-300)
        assert math.exp(-float(nll[0])) == pytest.approx(d.cdf(-1 + 1 / 255), rel=1e-6, abs=1e-300)


def test_discretized_gaussian_far_tail_is_finite_and_right():
    """A bin 30 σ from the mean: Φ(b) − Φ(a) would round to 0 in float64; the log-tail form does not."""
    x, mean, scale = torch.tensor([0.5], dtype=F64), torch.tensor([0.0], dtype=F64), torch.tensor([1 / 60], dtype=F64)
    got = float(L.discretized_gaussian_nll(x, mean, scale))
    d = stats.norm(0, 1 / 60)
    ref = -(d.logsf(0.5 - 1 / 255) + math.log(-math.expm1(d.logsf(0.5 + 1 / 255) - d.logsf(0.5 - 1 / 255))))
    assert got == pytest.approx(ref, rel=1e-9) and got > 400


# --- grids and the prior --------------------------------------------------------------------------

def test_vlb_grid_keeps_both_ends():
    assert torch.equal(L.vlb_grid(50), torch.arange(49, -1, -1))
    g = L.vlb_grid(1000, 10)
    assert len(g) == 10 and int(g[0]) == 999 and int(g[-1]) == 0 and bool((g[1:] < g[:-1]).all())
    for bad in (1, 1001):
        with pytest.raises(ConfigError):
            L.vlb_grid(1000, bad)


def test_prior_kl_closed_form():
    sched = NoiseSchedule.create("linear", 100, beta_start=1e-3, beta_end=0.05)
    z0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    a = float(sched.alpha_bar[-1])
    ref = sum(0.5 * (a * z * z + (1 - a) - 1 - math.log(1 - a)) for z in (1.0, -2.0, 0.5))
    assert float(L.prior_kl(sched, z0)) == pytest.approx(ref, rel=1e-12)
    a5 = float(sched.alpha_bar[5])  # at another grid top: index t, not t ± 1
    ref5 = sum(0.5 * (a5 * z * z + (1 - a5) - 1 - math.log(1 - a5)) for z in (1.0, -2.0, 0.5))
    assert float(L.prior_kl(sched, z0, 5)) == pytest.approx(ref5, rel=1e-12)


def test_reverse_variances():
    sched = NoiseSchedule.create("linear", 100, beta_start=1e-3, beta_end=0.05)
    b = sched.betas
    a = sched.alpha_bar
    assert L.reverse_variance(sched, 7, 6, "large") == pytest.approx(float(b[7]), rel=1e-12)
    assert L.reverse_variance(sched, 7, 6, "small") == pytest.approx(float((1 - a[6]) / (1 - a[7]) * b[7]), rel=1e-12)
    assert L.reverse_variance(sched, 9, 3, "large") == pytest.approx(float(1 - a[9] / a[3]), rel=1e-12)  # strided
    assert L.decoder_variance(sched, 0) == pytest.approx(float(b[0] / (1 - b[0])), rel=1e-12)
    with pytest.raises(ConfigError):
        L.reverse_variance(sched, 7, 6, "medium")


# --- the VLB on Gaussian data: an upper bound that closes as the model becomes ideal -------------

def _gap(gaussian, ts=None, variance="large"):
    sched, mu, cov, z0, nll = gaussian
    terms = L.vlb_terms(ideal_denoiser(sched, mu, cov), sched, z0, ts, variance=variance,
                        generator=torch.Generator().manual_seed(1), dtype=F64)
    gap = (terms.total - nll) / 2  # nats per dimension
    return float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))


def test_vlb_is_exact_for_the_ideal_denoiser_on_the_full_grid(gaussian):
    """β is the exact reverse variance of continuous data in the small-step limit: the gap closes."""
    gap, se = _gap(gaussian)
    assert abs(gap) < 3 * se + 2e-3, (gap, se)


def test_vlb_bounds_the_true_nll_from_above(gaussian):
    """A coarse grid and the β̃ variance are looser models: clearly above −log p, and more so when coarser."""
    full, _ = _gap(gaussian)
    coarse, se = _gap(gaussian, L.vlb_grid(200, 5))
    assert coarse > full + 4 * se, (coarse, full, se)
    small, se_small = _gap(gaussian, L.vlb_grid(200, 50), variance="small")
    assert small > 10 * se_small and small > 0.1


# --- the probability-flow ODE --------------------------------------------------------------------

def test_flow_nodes_have_integer_midpoints():
    sched = NoiseSchedule.create("linear", 1000)
    n = L.flow_nodes(sched, 7)
    assert int(n[0]) == 0 and int(n[-1]) == 998 and len(n) == 15
    assert torch.equal(n[1::2] * 2, n[0:-1:2] + n[2::2])  # each step's midpoint is an integer timestep
    assert len(L.flow_nodes(sched)) == 2 * 499 + 1
    with pytest.raises(ConfigError):
        L.flow_nodes(sched, 500)


@pytest.fixture(scope="module")
def correlated():
    sched = NoiseSchedule.create("linear", 1000)
    mu = torch.tensor([0.2, -0.3], dtype=F64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    z0 = mu + torch.randn(300, 2, generator=torch.Generator().manual_seed(3), dtype=F64) @ torch.linalg.cholesky(cov).T
    return sched, mu, cov, z0


def test_ode_exact_trace_matches_the_true_log_density(correlated):
    sched, mu, cov, z0 = correlated
    den = ideal_denoiser(sched, mu, cov)
    logp = L.flow_log_likelihood(den, sched, z0, steps=60, n_probes=None, dtype=F64)
    v0 = float((1 - sched.alpha_bar[0]) / sched.alpha_bar[0])  # the ODE starts at p_data ∗ N(0, v0)
    ref = -true_nll(z0, mu, cov + v0 * torch.eye(2, dtype=F64))
    err = (logp - ref) / 2  # per dimension
    assert float(err.abs().mean()) < 3e-3 and float(err.abs().max()) < 2e-2, err.abs().max()
    far = torch.tensor([[3.0, 3.0]], dtype=F64)  # sign: a point 5 σ out is much less likely
    assert float(L.flow_log_likelihood(den, sched, far, steps=20, n_probes=None, dtype=F64)) < float(logp.min())


@pytest.mark.parametrize("probe", L.PROBES)
def test_ode_hutchinson_is_unbiased(correlated, probe):
    sched, mu, cov, z0 = correlated
    den = ideal_denoiser(sched, mu, cov)
    exact = L.flow_log_likelihood(den, sched, z0, steps=20, n_probes=None, dtype=F64)
    hutch = L.flow_log_likelihood(den, sched, z0, steps=20, n_probes=1, probe=probe,
                                  generator=torch.Generator().manual_seed(4), dtype=F64)
    diff = hutch - exact
    assert float(diff.std()) > 1e-3  # the Jacobian is not diagonal: the probes do add noise
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff))


def test_ode_is_below_the_vlb(correlated):
    """The ODE's −log p is (near) exact; the strided VLB (β̃) is an upper bound: VLB − ODE > 0 on average."""
    sched, mu, cov, z0 = correlated
    den = ideal_denoiser(sched, mu, cov)
    ode_nll = -L.flow_log_likelihood(den, sched, z0, steps=20, n_probes=None, dtype=F64)
    vlb = L.vlb_terms(den, sched, z0, L.vlb_grid(1000, 8), variance="small", generator=torch.Generator().manual_seed(5),
                      dtype=F64).total
    d = vlb - ode_nll
    assert float(d.mean()) > 3 * float(d.std()) / math.sqrt(len(d))


# --- the codec's normalisation: the Jacobian -------------------------------------------------------

@pytest.mark.parametrize("scale", [3.0, 0.25])
def test_latent_kl_accounts_for_the_normalisation_jacobian(scale):
    """With an exact Gaussian prior on z_n = (z − shift)·scale, −H + CE is KL(q ‖ p) taken in z-space."""
    g = torch.Generator().manual_seed(6)
    mean = torch.randn(4000, 3, generator=g, dtype=F64)
    logvar = torch.full_like(mean, math.log(0.3))
    shift = torch.tensor(0.5, dtype=F64)
    out = E.latent_kl_terms(mean, logvar, shift, torch.tensor(scale, dtype=F64),
                            lambda zn: L.gaussian_nll(zn, 0.0, torch.tensor(1.0, dtype=F64)).sum(1), generator=g)
    # p(z) = N(shift, 1/scale²) in z-space
    ref = L.normal_kl(mean, logvar.exp(), shift, torch.tensor(1 / scale**2, dtype=F64)).sum(1)
    d = out["kl"] - ref
    assert abs(float(d.mean())) < 4 * float(d.std()) / math.sqrt(len(d)) + 1e-9
    assert float(out["log_det"][0]) == pytest.approx(3 * math.log(scale))  # 3 dimensions


# --- the decoder's scale and the whole-model estimate ---------------------------------------------

def test_decoder_scale_grid_search_recovers_sigma():
    g = torch.Generator().manual_seed(7)
    sigma = torch.tensor([[0.02, 0.1], [0.3, 0.05]], dtype=F64)
    mean = torch.rand(3000, 2, 2, generator=g, dtype=F64) * 1.6 - 0.8
    x = ((mean + sigma * torch.randn(mean.shape, generator=g, dtype=F64) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    coarse = torch.arange(math.log(1e-4), math.log(2.0), 0.05, dtype=F64)
    fitted = E._best_log_scale(x, mean, coarse, per_pixel=True).exp()
    assert torch.allclose(fitted, sigma, rtol=0.1)


def test_units_bits_per_dim_from_nats(tiny_pipe):
    """Per-image nats -> bits/dim divides by D·ln 2 (data) and per latent dim by D_z (latent)."""
    n, dx, dz = 4, 784, math.prod(tiny_pipe.autoencoder.latent_shape)
    rows = {k: [torch.full((n,), v, dtype=F64)] for k, v in
            {"reconstruction": 500.0, "entropy": -100.0, "cross_entropy": 50.0, "log_det": 10.0, "kl": 150.0,
             "prior": 1.0, "diffusion": 98.0, "decoder_t0": 1.0, "latent_vlb": 100.0}.items()}
    r = E._result(rows, tiny_pipe, n, {})
    assert r["bits_per_dim"] == pytest.approx(650.0 / (dx * math.log(2)))
    assert r["latent_vlb"]["latent_vlb"]["mean"] == pytest.approx(100.0 / dz)
    assert r["uniform_bits_per_dim"] == 8.0


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from conftest import build_tiny_model

    from latentdiff.pipeline import LatentDiffusion

    return LatentDiffusion.load(build_tiny_model(tmp_path_factory.mktemp("tiny-lik"), num_train_steps=20))


def test_evaluate_likelihood_on_a_tiny_model(tiny_pipe):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    train = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    r = E.evaluate_likelihood(tiny_pipe, images, train_images=train, grid_steps=5, ode_images=2, ode_steps=3,
                              batch_size=4, decoder_scale="global")
    b = r["data_bound"]
    assert b["total"]["mean"] == pytest.approx(b["reconstruction"]["mean"] - b["entropy"]["mean"]
                                               + b["cross_entropy"]["mean"], rel=1e-9)
    v = r["latent_vlb"]
    assert v["latent_vlb"]["mean"] == pytest.approx(v["prior"]["mean"] + v["diffusion"]["mean"]
                                                    + v["decoder_t0"]["mean"], rel=1e-9)
    # CE = VLB − log|det|, in bits per data dimension
    ce_bits = (v["latent_vlb"]["mean"] * r["latent_dims"]) / (r["data_dims"] * math.log(2)) - b["log_det"]["mean"]
    assert b["cross_entropy"]["mean"] == pytest.approx(ce_bits, rel=1e-6)
    assert r["ode"]["n_images"] == 2 and math.isfinite(r["ode"]["latent_nll"]["mean"])
    assert r["settings"]["grid_steps"] == 5 and r["n_images"] == 6
    table = E.format_likelihood_table(r)
    assert "bits/dim" in table and "uniform 8-bit: 8.0" in table
    again = E.evaluate_likelihood(tiny_pipe, images, train_images=train, grid_steps=5, batch_size=4,
                                  decoder_scale="global")
    assert again["bits_per_dim"] == r["bits_per_dim"]  # same seed, same estimate


def test_evaluate_likelihood_rejects_bad_input(tiny_pipe):
    good = np.zeros((2, 28, 28, 1), dtype=np.uint8)
    for kwargs in ({"decoder_scale": "row"}, {"ode_images": 3}, {"grid_steps": 1}, {"batch_size": 0},
                   {"labels": [0, 7]}, {"variance": "medium"}):
        with pytest.raises(ConfigError):
            E.evaluate_likelihood(tiny_pipe, good, train_images=good, **kwargs)
    with pytest.raises(ConfigError):
        E.evaluate_likelihood(tiny_pipe, np.zeros((2, 32, 32, 1), dtype=np.uint8), train_images=good)


def test_eval_likelihood_command(tiny_model_dir, latentdiff_cli):
    """`latentdiff eval --likelihood`: the per-term table and totals, and --json; it needs --model."""
    import json

    args = ("eval", "--likelihood", "--reference", "bundled", "--n", 4, "--grid-steps", 3, "--fit-images", 8)
    code, out, err = latentdiff_cli(*args, "--model", tiny_model_dir, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert "bits/dim (VLB data bound)" in out and result["n_images"] == 4
    assert result["settings"]["grid_steps"] == 3 and math.isfinite(result["bits_per_dim"])
    code, _, err = latentdiff_cli(*args[:2], "--samples", "x.npz")
    assert code == 2 and "--likelihood needs --model" in err
