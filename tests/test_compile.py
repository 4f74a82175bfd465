"""The fast sampling paths: opt-in torch.compile of the U-Net (same numbers as eager, a clean fallback where it
fails) and bf16 network arithmetic (``precision``), each against float32 eager."""

import warnings

import numpy as np
import pytest
import torch

from latentdiff.diffusion.cond import Cond
from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config
from latentdiff.utils import state as ld_state


def _tiny_pipe():
    cfg = load_config(preset="tiny", overrides=["unet.num_classes=3"])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), ("a", "b", "c"))
    for p in pipe.denoiser.parameters():  # zero-initialised output layers would make every output equal
        p.data.add_(0.01 * torch.randn_like(p))
    return pipe.eval()


def _inputs(pipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *pipe.autoencoder.latent_shape, generator=g)
    return x, torch.tensor([1, 30, 60, 99]), torch.tensor([0, 1, 2, 3])  # label 3 = the null class


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    pipe = _tiny_pipe()
    eager, _ = pipe.generate(3, steps=3, sampler="dpmpp-2m", labels=[0, 1, 2], guidance=2.0)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile is unavailable here .RuntimeError: no compiler here.; "
                                            "running the network eagerly"):
        images, _ = pipe.generate(3, steps=3, sampler="dpmpp-2m", labels=[0, 1, 2], guidance=2.0, compile=True)
    assert np.array_equal(images, eager)


def test_failure_on_first_call_falls_back_once(monkeypatch):
    """Compilation is lazy: a backend that fails when first run must also end in eager results."""
    pipe = _tiny_pipe()
    calls = []

    def lazy_broken(net, **kwargs):
        def fn(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("backend compiler failed")
        return fn

    monkeypatch.setattr(torch, "compile", lazy_broken)
    x, t, y = _inputs(pipe)
    den = pipe.compiled_denoiser(True)
    with pytest.warns(RuntimeWarning, match="backend compiler failed"):
        out = den(x, t, Cond(labels=y))
    torch.testing.assert_close(out.x0, pipe.denoiser(x, t, Cond(labels=y)).x0, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        den(x, t, Cond(labels=y))
    assert len(calls) == 1
    assert pipe.compiled_denoiser(True) is den  # cached per mode
    with pytest.raises(ConfigError, match="unknown compile mode"):
        pipe.compiled_denoiser("fastest")


def test_compiled_denoiser_shares_the_weights_and_keeps_save_format(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda net, **kw: net)  # the wiring, without a backend
    pipe = _tiny_pipe()
    den = pipe.compiled_denoiser()
    assert den.net.eager is pipe.denoiser.net and den.num_classes == pipe.denoiser.num_classes
    pipe.save(tmp_path / "m")  # the state dict is the uncompiled network's
    assert LatentDiffusion.load(tmp_path / "m").denoiser.net.state_dict().keys() == pipe.denoiser.net.state_dict().keys()


def test_cuda_graph_mode_copies_each_output_out(monkeypatch):
    """With CUDA graphs every replay writes into the same memory; samplers keep earlier predictions, so the
    reduce-overhead wrapper marks a new step per call and hands out a copy (simulated here on a CPU)."""
    shared = torch.zeros(())
    steps = []

    def graphed(net, **kwargs):
        def fn(*args):
            shared.copy_(net(*args).sum())  # "replay": the result lands in the graph's static output
            return shared
        return fn

    monkeypatch.setattr(torch, "compile", graphed)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    pipe = _tiny_pipe()
    x, t, y = _inputs(pipe)
    net = pipe.compiled_denoiser("reduce-overhead").net
    first = net(x, t, y)
    second = net(x * 2, t, y)
    assert first.data_ptr() != shared.data_ptr() and first != second and len(steps) == 2
    assert pipe.compiled_denoiser("default").net(x, t, y) is shared  # no copy without graphs


# inductor compiles C++ kernels: 25 s on 2 idle cores, so this runs in CI (the training one below is slower)
def test_compiled_unet_matches_eager_within_bf16_tolerance():
    pipe = _tiny_pipe()
    x, t, y = _inputs(pipe)
    den = pipe.compiled_denoiser()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = den.net(x, t, y)
    fallback = [w for w in caught if "torch.compile is unavailable" in str(w.message)]
    if fallback:
        pytest.skip(f"torch.compile does not work on this CPU: {fallback[0].message}")
    with torch.no_grad():
        eager = pipe.denoiser.net(x, t, y)
    assert compiled.shape == eager.shape and eager.abs().max() > 0.05  # a non-trivial output to compare
    torch.testing.assert_close(compiled, eager, rtol=1.6e-2, atol=1e-3)  # bf16's resolution is 2^-8 ≈ 4e-3


@pytest.mark.slow
def test_training_compile_matches_eager(tmp_path):
    """`training.compile` (torch.compile of the trained network, here the autoencoder's encoder and decoder)
    trains to the same weights as eager within float tolerance, and checkpoints keep their names."""
    from test_reliability import make_stage, run


    run(make_stage(steps=3), tmp_path / "eager")
    stage = make_stage(steps=3, compile=True)
    try:
        run(stage, tmp_path / "compiled")
    except Exception as e:  # inductor needs a working C++ toolchain
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {e}")
    from latentdiff.training.metrics import read_metrics

    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in (stage.model.encoder, stage.model.decoder))

    # The loss at every step agrees (the forward and backward are what compile changes) ...
    la = [r["loss"] for r in read_metrics(tmp_path / "eager" / "autoencoder_metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "compiled" / "autoencoder_metrics.jsonl")]
    assert len(la) == len(lb) == 3
    assert lb == pytest.approx(la, rel=1e-4)
    # ... and the checkpoints hold the same tensors under the same names. Parameters whose exact gradient is
    # zero (biases in front of GroupNorm) get rounding noise that Adam turns into steps of up to lr, so the
    # weights are compared to within the 3 Adam steps' bound (lr 1e-3).
    a, _ = ld_state.load_state(tmp_path / "eager" / "checkpoints" / "autoencoder-00000003.safetensors")
    b, _ = ld_state.load_state(tmp_path / "compiled" / "checkpoints" / "autoencoder-00000003.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=3.5e-3, msg=k)


def test_bf16_sampling_matches_fp32_within_bf16_tolerance():
    """precision="bf16" autocasts the networks only: the sampler's update stays float32, so 20 guided steps
    land within a few uint8 levels of the float32 result, and "fp32" is bitwise the CPU default ("auto")."""
    pipe = _tiny_pipe()
    kw = {"steps": 20, "sampler": "dpmpp-2m", "labels": [0, 1, 2, 0], "guidance": 2.0, "seed": 3}
    fp32, _ = pipe.generate(4, precision="fp32", **kw)
    auto, _ = pipe.generate(4, **kw)
    bf16, _ = pipe.generate(4, precision="bf16", **kw)
    assert np.array_equal(fp32, auto)  # auto means float32 on a CPU
    diff = np.abs(bf16.astype(int) - fp32.astype(int))
    assert fp32.std() > 5 and not np.array_equal(bf16, fp32)  # non-trivial images, and bf16 really ran
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())  # another seed: mean 44


def test_bf16_autocast_reaches_the_network(monkeypatch):
    pipe = _tiny_pipe()
    seen = []
    orig = pipe.denoiser.net.forward
    monkeypatch.setattr(pipe.denoiser.net, "forward",
                        lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or orig(*a, **k))
    pipe.generate(2, steps=2, labels=[0, 1], precision="bf16")
    pipe.generate(2, steps=2, labels=[0, 1], precision="fp32")
    assert seen == [True, True, False, False]
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        pipe.generate(2, steps=2, labels=[0, 1], precision="fp16")


def test_training_channels_last_matches_contiguous(tmp_path):
    """`training.channels_last` changes the memory layout only: the same losses within float tolerance, the
    network really trains in NHWC, and checkpoints hold the same names in the standard layout."""
    from test_reliability import make_stage, run

    from latentdiff.training.metrics import read_metrics

    run(make_stage(steps=3), tmp_path / "nchw")
    stage = make_stage(steps=3, channels_last=True)
    run(stage, tmp_path / "nhwc")
    conv = next(p for p in stage.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    la = [r["loss"] for r in read_metrics(tmp_path / "nchw" / "autoencoder_metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "nhwc" / "autoencoder_metrics.jsonl")]
    assert len(la) == len(lb) == 3 and lb == pytest.approx(la, rel=1e-4)
    a, _ = ld_state.load_state(tmp_path / "nchw" / "checkpoints" / "autoencoder-00000003.safetensors")
    b, _ = ld_state.load_state(tmp_path / "nhwc" / "checkpoints" / "autoencoder-00000003.safetensors")
    assert a.keys() == b.keys()
    for k in (k for k in a if k.startswith("model.")):
        assert b[k].is_contiguous()
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=3.5e-3, msg=k)  # 3 Adam steps of lr 1e-3, as above
