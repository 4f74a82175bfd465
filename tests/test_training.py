"""The training seams: the per-sample diffusion loss in closed form (float64), the loop's stop and lr
hooks, the fault record, logging through the stdlib logger, and the optional TensorBoard writer."""

import importlib.util

import pytest
import torch

from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.loss import diffusion_loss, drop_cond, min_snr_weight
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError
from latentdiff.training.loop import Health, TrainLoop, agree


def test_min_snr_weight_turns_each_target_error_into_the_clipped_x0_error():
    """For any prediction error, weight · ||target error||² = min(SNR, γ) · ||x̂0 - x0||² (Hang et al. eq. 9)."""
    g = torch.Generator().manual_seed(0)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001], dtype=torch.float64)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a, s = abar.sqrt()[:, None], (1 - abar).sqrt()[:, None]
    xt = a * x0 + s * eps
    x0_hat = x0 + torch.randn(5, 3, generator=g, dtype=torch.float64)  # some wrong estimate
    eps_hat = (xt - a * x0_hat) / s                                     # what it implies for ε
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    x0_err = (x0_hat - x0).square().sum(1)
    gamma = 5.0
    want = torch.minimum(abar / (1 - abar), torch.tensor(gamma, dtype=torch.float64)) * x0_err
    for kind, err in (("eps", (eps_hat - eps).square().sum(1)), ("v", (v_hat - v).square().sum(1)), ("x0", x0_err)):
        got = min_snr_weight(abar, gamma, kind).double() * err
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=kind)  # the weight is computed in float32
    with pytest.raises(ConfigError):
        min_snr_weight(abar, gamma, "score")


def test_drop_cond_replaces_a_fraction_p_by_the_null_condition():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(10, (20000,), generator=g)
    null = Cond(labels=torch.full_like(y, 10))
    assert torch.equal(drop_cond(Cond(labels=y), null, 0.0, g).labels, y)
    out = drop_cond(Cond(labels=y), null, 0.25, g).labels
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.015
    assert torch.equal(out[~dropped], y[~dropped])


class _Oracle(torch.nn.Module):
    """A 'network' returning a fixed multiple of the true ε: the loss is known in closed form."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, zt, t, labels=None):
        return self.c * self.eps[self.rows]


def test_diffusion_loss_per_sample_in_closed_form():
    """ε-prediction with output c·ε: per-sample loss mean((c-1)² ε²); rows pick the samples of one process."""
    sched = NoiseSchedule.create("linear", 100)
    net = _Oracle(0.5)
    den = Denoiser(net, sched, "eps")
    z0 = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    ref = torch.Generator().manual_seed(7)
    torch.randint(100, (6,), generator=ref)                       # the loss draws t first, then ε
    net.eps, net.rows = torch.randn(z0.shape, generator=ref), slice(2, 5)
    loss = diffusion_loss(den, z0, None, gen, rows=slice(2, 5))
    want = (0.25 * net.eps[2:5].double().square()).flatten(1).mean(1)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


# --- the loop's seams ---------------------------------------------------------------------------------

def _stage(**train):
    from test_reliability import make_stage

    return make_stage(**train)


def test_should_stop_and_lr_hooks_drive_the_loop_without_files(tmp_path):
    seen, lrs = [], []

    def should_stop(step, elapsed):
        seen.append((step, elapsed >= 0))
        return step >= 3

    loop = TrainLoop(_stage(steps=100), None, torch.device("cpu"), precision="fp32", progress=False,
                     should_stop=should_stop, lr=lambda step: lrs.append(step) or 1e-3)
    model = loop.run()
    assert loop.step == 3 and lrs == [0, 1, 2] and [s for s, _ in seen] == [0, 1, 2, 3] and all(ok for _, ok in seen)
    assert model is loop.ema.model and not model.training


def test_health_and_agreement_name_the_first_bad_step():
    h = Health(torch.device("cpu"))
    yes, no = torch.tensor(True), torch.tensor(False)
    assert agree(h, False).fault_step is None
    h.record(1, yes, yes)
    h.record(2, yes, no)    # gradient only
    h.record(3, no, no)     # a later loss fault does not replace the first
    a = agree(h, True)
    assert (a.fault_step, a.fault_in_loss, a.stop) == (2, False, True)
    h2 = Health(torch.device("cpu"))
    h2.record(4, no, no)
    assert agree(h2, False).fault_in_loss


def test_messages_go_through_the_latentdiff_logger(tmp_path):
    from test_reliability import run

    lines = run(_stage(steps=2), tmp_path)
    lines += run(_stage(steps=4), tmp_path, resume=True)
    assert "resumed autoencoder from autoencoder-00000002.safetensors at step 2" in lines


def test_tensorboard_requested_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from test_reliability import run

    with pytest.raises(ConfigError, match="training.tensorboard is true but the tensorboard package is not installed"):
        run(_stage(steps=2, tensorboard=True), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_reliability import run

    run(_stage(steps=3, tensorboard=True), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "autoencoder"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert {"loss", "lr", "img_s"} <= set(acc.Tags()["scalars"])
