"""Export: ONNX (+ ONNX Runtime sampling) and the diffusers folder, each against the PyTorch model.

Tolerances: network outputs within 1e-4 · max(1, max |torch|) (float32 kernels sum in different orders; measured
~1e-6); uint8 images: differences of at most 1, on at most 1% of the values (measured: none on the tiny models).
The extras are optional: tests that need them skip cleanly without them (pytest.importorskip).
"""

import json
import sys

import numpy as np
import pytest
import torch

from latentdiff.errors import ConfigError, ModelError
from latentdiff.export.diffusers import (
    decoder_module_pairs,
    export_diffusers,
    map_state,
    scheduler_config,
    unet_config,
    unet_module_pairs,
)
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config
from latentdiff.sampling.grids import timesteps

CLASSES = ("a", "b", "c")


def _pipe(image_size=(28, 28), base=32, steps=100, **over) -> LatentDiffusion:
    """A tiny model with perturbed weights (zero-initialised output layers would make every output equal)."""
    overrides = ["unet.num_classes=3", f"unet.base_channels={base}", f"diffusion.num_train_steps={steps}",
                 *[f"{k}={v}" for k, v in over.items()]]
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(load_config(preset="tiny", overrides=overrides), image_size, CLASSES).eval()
    with torch.no_grad():
        for p in [*pipe.denoiser.parameters(), *pipe.autoencoder.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return pipe


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4):
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err


def _images_match(a: np.ndarray, b: np.ndarray):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 1 and (d > 0).mean() <= 0.01, (d.max(), (d > 0).mean())


def _inputs(pipe, n=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *pipe.autoencoder.latent_shape, generator=g)
    T = pipe.denoiser.schedule.num_steps
    return x, torch.tensor([0, T // 3, T // 2, T - 1])[:n], torch.tensor([0, 1, 2, 3])[:n]  # 3 = null label


# --- the weight mapping and configs (need diffusers only to build the target models) -----------------------------

def test_every_tensor_is_mapped_once_and_the_targets_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    from latentdiff.export.decoder_template import LatentDiffDecoder
    from latentdiff.export.diffusers import decoder_config

    pipe = _pipe()
    unet = map_state(pipe.denoiser.net.state_dict(), unet_module_pairs(pipe.cfg.unet))
    target = UNet2DModel.from_config(unet_config(pipe)).state_dict()
    assert set(unet) == set(target) and all(unet[k].shape == target[k].shape for k in target)
    ae = pipe.autoencoder
    dec = map_state(ae.decoder.state_dict(), decoder_module_pairs(ae.cfg.levels, ae.cfg.num_res_blocks, False))
    target = LatentDiffDecoder.from_config(decoder_config(pipe)).state_dict()
    assert set(dec) == set(target) and all(dec[k].shape == target[k].shape for k in target)


def test_an_unmapped_tensor_is_an_error():
    pipe = _pipe()
    state = {**pipe.denoiser.net.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match="no diffusers name, e.g. extra.weight"):
        map_state(state, unet_module_pairs(pipe.cfg.unet))


def test_timestep_embedding_is_diffusers_flip_sin_to_cos_with_freq_shift_0():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding

    from latentdiff.nn.layers import timestep_embedding

    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    ours = timestep_embedding(t, 64)
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours[0, :32], torch.ones(32)) and torch.equal(ours[0, 32:], torch.zeros(32))  # cos first
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "scaled-linear", "cosine"])
def test_scheduler_config_reproduces_the_schedule_and_the_trailing_grid(kind):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    pipe = _pipe(steps=1000, **{"diffusion.schedule": kind})
    sched = DDIMScheduler.from_config(scheduler_config(pipe))
    ref = pipe.denoiser.schedule.alpha_bar  # float64
    torch.testing.assert_close(sched.alphas_cumprod.double(), ref, rtol=1e-5, atol=1e-6)
    assert sched.config.prediction_type == "v_prediction"
    for steps in (10, 20, 50):  # grids that divide T: DDIM's step t -> t - T/steps is then our next grid point
        sched.set_timesteps(steps)
        assert torch.equal(sched.timesteps, timesteps(1000, steps, "trailing"))


def test_a_unet_with_mixed_group_counts_is_refused_with_the_reason(tmp_path):
    pipe = _pipe(base=16)  # widths 16 and 32: GroupNorm groups gcd(32, C) = 16 and 32
    with pytest.raises(ModelError, match="GroupNorm group counts differ"):
        export_diffusers(pipe, tmp_path / "out")


# --- the diffusers folder ---------------------------------------------------------------------------------------

def _load_diffusers(out):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dp = DiffusionPipeline.from_pretrained(str(out), custom_pipeline=str(out), trust_remote_code=True)
    dp.set_progress_bar_config(disable=True)
    return dp


@pytest.mark.parametrize("image_size", [(28, 28), (32, 32)])  # latent 7×7 (upsample hooks) and 8×8 (stock)
def test_diffusers_unet_and_decoder_match_ours(tmp_path, image_size):
    pytest.importorskip("diffusers")
    pipe = _pipe(image_size)
    summary = export_diffusers(pipe, tmp_path / "out")
    assert bool(summary["notes"]) == (image_size == (28, 28))
    assert summary["autoencoderkl_blockers"][0].startswith("encoder:")
    dp = _load_diffusers(tmp_path / "out")
    assert type(dp.unet).__name__ == "UNet2DModel" and type(dp.scheduler).__name__ == "DDIMScheduler"
    x, t, y = _inputs(pipe)
    with torch.no_grad():
        _close(dp.unet(x, t, class_labels=y).sample, pipe.denoiser.net(x, t, y))
        _close(dp.vae.decode(x[:, :2]), pipe.autoencoder.decode(x[:, :2]))
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["class_names"] == list(CLASSES) and index["vae"] == ["latentdiff_decoder", "LatentDiffDecoder"]


def test_diffusers_pipeline_samples_the_same_images(tmp_path):
    pytest.importorskip("diffusers")
    pipe = _pipe()
    export_diffusers(pipe, tmp_path / "out")
    dp = _load_diffusers(tmp_path / "out")
    for labels, guidance in (([0, 1, 2], 2.0), (None, 1.0)):
        ours, _ = pipe.generate(3, sampler="ddim", steps=4, seed=5, labels=labels, guidance=guidance)
        got = dp(class_labels=labels, num_images=3, guidance_scale=guidance, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(5), output_type="np").images
        _images_match(np.round(got * 255).astype(np.uint8), ours)  # to_uint8: (x + 1) · 127.5, rounded
    names = dp(class_labels=["c", "a"], guidance_scale=2.0, num_inference_steps=4,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    ours, _ = pipe.generate(2, sampler="ddim", steps=4, seed=5, labels=[2, 0], guidance=2.0)
    _images_match(np.round(names * 255).astype(np.uint8), ours)


def test_shipped_model_in_diffusers(tmp_path):
    """pretrained:fashion-mnist: widths 64/128 map onto UNet2DModel; its decoder (widths 24/48/96, GroupNorm groups
    8/16/32) is why vae/ is a custom component."""
    pytest.importorskip("diffusers")
    pipe = LatentDiffusion.load("pretrained:fashion-mnist")
    summary = export_diffusers(pipe, tmp_path / "out")
    assert any("[8, 16, 32]" in b for b in summary["autoencoderkl_blockers"])
    dp = _load_diffusers(tmp_path / "out")
    x, t, y = _inputs(pipe)
    y[-1] = 10  # the null label
    with torch.no_grad():
        _close(dp.unet(x, t * 300, class_labels=y).sample, pipe.denoiser.net(x, t * 300, y))
    ours, _ = pipe.generate(2, sampler="ddim", steps=5, seed=0, labels=[3, 7], guidance=2.0)
    got = dp(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=5,
             generator=torch.Generator().manual_seed(0), output_type="np").images
    _images_match(np.round(got * 255).astype(np.uint8), ours)


# --- ONNX ---------------------------------------------------------------------------------------------------------

def test_missing_onnxruntime_is_one_clear_error(monkeypatch, tmp_path):
    from latentdiff.export import load_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ConfigError, match=r"onnxruntime, which is not installed; .*pip install 'latentdiff\[onnx\]'"):
        load_onnx(tmp_path)


def test_a_model_directory_is_not_an_onnx_export(tiny_model_dir):
    pytest.importorskip("onnxruntime")
    from latentdiff.export import load_onnx

    with pytest.raises(ModelError, match="is a model directory, not an ONNX export"):
        load_onnx(tiny_model_dir)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """One export shared by the ONNX tests: the dynamo exporter takes ~10 s per graph on 2 cores (3 graphs)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from latentdiff.export import export_onnx

    model_dir = tmp_path_factory.mktemp("model")
    _pipe(steps=10).save(model_dir)
    pipe = LatentDiffusion.load(model_dir)
    out = tmp_path_factory.mktemp("onnx")
    return pipe, out, export_onnx(pipe, out)


def test_onnx_export_writes_graphs_config_and_parity(onnx_export):
    import onnx

    pipe, out, summary = onnx_export
    assert summary["files"] == ["config.json", "decoder.onnx", "encoder.onnx", "unet.onnx"]
    assert all(e <= 1e-4 for e in summary["max_abs_error"].values()) and len(summary["max_abs_error"]) == 3
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"] == json.loads(json.dumps(pipe.cfg.to_dict())) and meta["class_names"] == list(CLASSES)  # the model's config.json
    assert meta["onnx"]["schedule"]["prediction"] == "v" and len(meta["onnx"]["schedule"]["alphas_cumprod"]) == 10
    for name in ("unet", "decoder", "encoder"):
        model = onnx.load(str(out / f"{name}.onnx"))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        batch = [i.type.tensor_type.shape.dim[0] for i in model.graph.input]
        assert all(d.dim_param and not d.dim_value for d in batch), name  # a symbolic (dynamic) batch
    assert [i.name for i in onnx.load(str(out / "unet.onnx")).graph.input] == ["sample", "timestep", "class_labels"]


def test_onnx_runtime_samples_the_same_images(onnx_export):
    from latentdiff.export import load_onnx

    pipe, out, _ = onnx_export
    rt = load_onnx(out, threads=1)
    assert rt.denoiser.net.session.get_session_options().intra_op_num_threads == 1
    for kwargs in ({"labels": [0, 1, 2, 0, 1], "guidance": 2.0, "sampler": "dpmpp-2m"},
                   {"labels": None, "sampler": "ddim", "eta": 1.0}, {"labels": 2, "sampler": "euler"}):
        ours, _ = pipe.generate(5, steps=4, seed=7, batch_size=3, **kwargs)
        got, _ = rt.generate(5, steps=4, seed=7, batch_size=3, **kwargs)
        _images_match(got, ours)


def test_onnx_runtime_runs_the_control_functions(onnx_export):
    from latentdiff.export import load_onnx
    from latentdiff.pipeline.control import img2img

    pipe, out, _ = onnx_export
    rt = load_onnx(out)
    images, _ = pipe.generate(2, steps=3, seed=1, labels=[0, 1])
    ours = img2img(pipe, images, 0.6, labels=2, guidance=2.0, steps=4, seed=3)
    _images_match(img2img(rt, images, 0.6, labels=2, guidance=2.0, steps=4, seed=3), ours)


def test_onnx_runtime_refuses_what_needs_gradients(onnx_export):
    from latentdiff.export import load_onnx
    from latentdiff.guidance.gradient import brightness, user_guidance

    _, out, _ = onnx_export
    rt = load_onnx(out)
    with pytest.raises(ConfigError, match="classifier guidance needs gradients"):
        rt.generate(2, steps=2, labels=[0, 1], classifier_scale=1.0)
    fn = user_guidance(rt.denoiser.bind(None), brightness(0.5), 1.0, rt.denoiser.schedule)
    with pytest.raises(ConfigError, match="ONNX Runtime does not compute"):
        fn(torch.randn(1, *rt.autoencoder.latent_shape), torch.tensor([5]))
    with pytest.raises(ConfigError, match="--compile applies to the PyTorch runtime"):
        rt.generate(1, steps=2, compile=True)


def test_parity_check_fails_loudly(onnx_export):
    from latentdiff.export import check_parity

    pipe, out, _ = onnx_export
    changed = LatentDiffusion.load(pipe.directory)
    with torch.no_grad():
        changed.denoiser.net.conv_out.bias.add_(0.01)
    with pytest.raises(ModelError, match="ONNX parity check failed for unet"):
        check_parity(changed, out)


@pytest.mark.slow
def test_shipped_model_in_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from latentdiff.export import export_onnx, load_onnx

    pipe = LatentDiffusion.load("pretrained:fashion-mnist")
    export_onnx(pipe, tmp_path)
    ours, _ = pipe.generate(8, steps=10, seed=0, labels=list(range(8)), guidance=2.0)
    got, _ = load_onnx(tmp_path).generate(8, steps=10, seed=0, labels=list(range(8)), guidance=2.0)
    _images_match(got, ours)


def test_cli_sample_with_the_onnx_runtime_reproduces_pytorch(onnx_export, latentdiff_cli, tmp_path):
    """`latentdiff sample --runtime onnx` over an export gives the PyTorch command's images, byte for byte here."""
    from PIL import Image

    pipe, out, _ = onnx_export
    args = ("--n", 4, "--steps", 3, "--seed", 2, "--no-progress")
    code, _, err = latentdiff_cli("sample", "--model", pipe.directory, "--out", tmp_path / "torch.png", *args)
    assert code == 0, err
    code, _, err = latentdiff_cli("sample", "--model", out, "--runtime", "onnx", "--threads", 1,
                                  "--out", tmp_path / "onnx.png", *args)
    assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("torch", "onnx"))
    assert a.shape == b.shape and (np.abs(a - b) > 1).sum() == 0 and (a != b).mean() <= 0.01
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "in.png")
    for runtime, name in (("torch", "e_torch.png"), ("onnx", "e_onnx.png")):  # a control command under ONNX Runtime
        model = out if runtime == "onnx" else pipe.directory
        code, _, err = latentdiff_cli("edit", tmp_path / "in.png", "--model", model, "--runtime", runtime,
                                      "--class", 1, "--steps", 4, "--out", tmp_path / name)
        assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("e_torch.png", "e_onnx.png"))
    assert (np.abs(a - b) > 1).sum() == 0


def test_cli_runtime_and_export_refusals(onnx_export, latentdiff_cli, tiny_model_dir, tmp_path):
    from conftest import assert_one_line_error

    pipe, out, _ = onnx_export
    code, _, err = latentdiff_cli("sample", "--model", out, "--runtime", "onnx", "--device", "cuda", "--out",
                                  tmp_path / "x.png")
    assert_one_line_error(code, err, "runs on the CPU")
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--threads", 2, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "--threads applies to --runtime onnx only")
    code, _, err = latentdiff_cli("sample", "--model", tiny_model_dir, "--runtime", "onnx", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "not an ONNX export")
    code, _, err = latentdiff_cli("export", "onnx", tiny_model_dir, out)  # a folder that already holds an export
    assert_one_line_error(code, err, "is not an empty folder")
    code, _, err = latentdiff_cli("export", "diffusers", tiny_model_dir, tmp_path / "d")
    assert_one_line_error(code, err)  # the tiny U-Net's group counts differ between layers: refused with the reason
    assert not (tmp_path / "x.png").exists()
    code, text, _ = latentdiff_cli("export", "--help")
    assert code == 0 and "onnx" in text and "diffusers" in text
