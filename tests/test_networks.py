"""Network shapes, autoencoder learning, model save/load identity, checkpoints and exact resume."""

import json

import numpy as np
import pytest
import torch

from latentdiff.codecs.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.diffusion.cond import Cond
from latentdiff.errors import ConfigError, ModelError
from latentdiff.guidance.cfg import classifier_free
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config
from latentdiff.training import checkpoints as ckpt
from latentdiff.utils import state as ld_state


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (20, 1)])
def test_autoencoder_and_unet_shapes(factor, size, channels):
    cfg = AutoencoderConfig(image_channels=channels, latent_channels=3, factor=factor, base_channels=8)
    ae = Autoencoder(cfg, (size, size))
    x = torch.randn(2, channels, size, size)
    post = ae.encode(x)
    assert tuple(post.mean.shape[1:]) == ae.latent_shape == cfg.latent_shape((size, size))
    assert ae.decode(post.sample()).shape == x.shape
    unet = UNet(UNetConfig(in_channels=3, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                           attention_levels=(1, 2), num_classes=4))
    z = post.mean
    out = unet(z, torch.tensor([0, 999]), torch.tensor([1, 4]))  # 4 = the null label
    assert out.shape == z.shape


def test_autoencoder_rejects_wrong_image_size():
    ae = Autoencoder(AutoencoderConfig(base_channels=8), (28, 28))
    with pytest.raises(ConfigError, match="expects images of shape 1×28×28"):
        ae.encode(torch.zeros(1, 1, 32, 32))


def test_kl_matches_closed_form():
    from latentdiff.codecs.autoencoder import DiagonalGaussian
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, -0.3]])
    kl = DiagonalGaussian(mean, logvar).kl()
    expected = sum(0.5 * (m**2 + np.exp(lv) - 1 - lv) for m, lv in zip([0.5, -1.0], [0.2, -0.3]))
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_autoencoder_trains_down_on_a_tiny_batch():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=8, latent_channels=2, factor=2), (12, 12))
    x = torch.rand(8, 1, 12, 12) * 2 - 1
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss, _ = ae.loss(x, generator=g)
        loss = loss.mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("stats", ["per-channel", "global"])
def test_latent_stats_normalise_latents(stats):
    ae = Autoencoder(AutoencoderConfig(base_channels=8, latent_stats=stats), (16, 16))
    x = torch.rand(64, 1, 16, 16) * 2 - 1
    ae.fit_latent_stats(x)
    z = ae.to_latent(x)  # (N, c, h, w), normalised
    if stats == "global":
        assert z.std().item() == pytest.approx(1.0, rel=1e-4)
        assert torch.all(ae.latent_shift == 0)
    else:
        per_channel = z.transpose(0, 1).flatten(1)
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(per_channel.std(1), torch.ones(4), atol=1e-4, rtol=0)
    # normalise and denormalise are inverse; from_latent decodes the denormalised latent
    post = ae.encode(x)
    torch.testing.assert_close(ae.denormalize(ae.normalize(post.mean)), post.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.from_latent(z), ae.decode(post.mean), atol=1e-5, rtol=1e-5)


def test_a_codec_saved_with_one_scale_factor_loads_with_the_same_arithmetic():
    """Files from before per-channel statistics hold one `scale_factor` s: z_n = z · s exactly, z = z_n / s."""
    ae = Autoencoder(AutoencoderConfig(base_channels=8), (16, 16))
    sd = {k: v for k, v in ae.state_dict().items() if not k.startswith("latent_")}
    sd["scale_factor"] = torch.tensor(0.37)
    ae.load_state_dict(sd)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    mean = ae.encode(x).mean
    assert torch.equal(ae.to_latent(x), mean * torch.tensor(0.37))
    assert torch.equal(ae.from_latent(mean), ae.decode(mean / torch.tensor(0.37)))


def _tiny_pipe(num_classes=3):
    cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={num_classes}"])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), tuple(f"c{i}" for i in range(num_classes)))
    for p in pipe.denoiser.parameters():  # zero-initialised output layers would make every sample equal
        p.data.add_(0.01 * torch.randn_like(p))
    return pipe.eval()


def test_save_load_gives_bit_identical_samples(tmp_path):
    pipe = _tiny_pipe()
    a, la = pipe.generate(6, seed=7, labels=[0, 1, 2, 0, 1, 2], guidance=2.0, steps=4)
    pipe.save(tmp_path / "m")
    loaded = LatentDiffusion.load(tmp_path / "m")
    b, lb = loaded.generate(6, seed=7, labels=[0, 1, 2, 0, 1, 2], guidance=2.0, steps=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = loaded.generate(6, seed=8, labels=[0, 1, 2, 0, 1, 2], guidance=2.0, steps=4)
    assert not np.array_equal(a, c)
    assert (tmp_path / "m" / "model_card.md").read_text().startswith("# latentdiff model")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["class_names"] == ["c0", "c1", "c2"]


def test_guidance_scale_one_equals_conditional_model():
    pipe = _tiny_pipe()
    x = torch.randn(3, *pipe.autoencoder.latent_shape)
    t = torch.tensor([10, 50, 90])
    y = torch.tensor([0, 1, 2])
    cond = pipe.denoiser(x, t, Cond(labels=y))
    for scale, expected in ((1.0, cond), (0.0, pipe.denoiser(x, t, None))):
        out = classifier_free(pipe.denoiser, Cond(labels=y), scale)(x, t)
        torch.testing.assert_close(out.x0, expected.x0, rtol=1e-5, atol=1e-5)
    # scale 3 extrapolates: x̂ = x̂_u + 3 (x̂_c - x̂_u)
    unc = pipe.denoiser(x, t, None)
    out = classifier_free(pipe.denoiser, Cond(labels=y), 3.0)(x, t)
    torch.testing.assert_close(out.eps, unc.eps + 3 * (cond.eps - unc.eps), rtol=1e-5, atol=1e-5)


def test_corrupt_model_files_are_detected(tmp_path):
    pipe = _tiny_pipe()
    pipe.save(tmp_path / "m")
    weights = tmp_path / "m" / "denoiser.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the tensor data
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="corrupted"):
        LatentDiffusion.load(tmp_path / "m")
    weights.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(ModelError, match="not a valid safetensors"):
        LatentDiffusion.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json is missing"):
        LatentDiffusion.load(tmp_path / "m")
    with pytest.raises(ModelError, match="not found"):
        LatentDiffusion.load(tmp_path / "nope")


def test_checkpoint_state_round_trip_and_latest_intact(tmp_path):
    t = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    ld_state.save_state(ckpt.checkpoint_path(tmp_path, "s", 1), t, {"step": 1})
    ld_state.save_state(ckpt.checkpoint_path(tmp_path, "s", 2), t, {"step": 2})
    newest = ckpt.checkpoint_path(tmp_path, "s", 2)
    newest.write_bytes(newest.read_bytes()[:50])  # truncate the newest
    warnings = []
    tensors, meta, path = ckpt.load_latest(tmp_path, "s", warn=warnings.append)
    assert meta["step"] == 1 and path.name == "s-00000001.safetensors"
    assert torch.equal(tensors["a"], t["a"]) and warnings
    assert not list(tmp_path.glob("*.tmp"))


def test_scale_shift_embedding_reaches_single_channel_groups():
    """At width 32, GroupNorm has one channel per group: an added embedding is subtracted again by the norm
    (the block cannot see the timestep), while adaptive GroupNorm's scale and shift survive it."""
    from latentdiff.nn.layers import ResBlock

    torch.manual_seed(0)
    x, e1, e2 = torch.randn(2, 32, 8, 8), torch.randn(2, 16), torch.randn(2, 16)
    for scale_shift, sees_embedding in ((False, False), (True, True)):
        block = ResBlock(32, 32, emb_dim=16, scale_shift=scale_shift)
        torch.nn.init.normal_(block.conv2.weight)  # conv2 starts at zero (identity block): make h visible
        changed = (block(x, e1) - block(x, e2)).abs().max().item()
        assert (changed > 1e-3) is sees_embedding, (scale_shift, changed)
    with pytest.raises(ConfigError, match="unet.embedding"):
        UNet(UNetConfig(embedding="film"))


def test_scale_shift_unet_keeps_the_state_dict_keys():
    base = dict(in_channels=4, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,))
    add, ada = UNet(UNetConfig(**base)), UNet(UNetConfig(**base, embedding="scale-shift"))
    assert set(add.state_dict()) == set(ada.state_dict())  # same tensors, the embedding projections twice as wide
    assert ada.state_dict()["mid.0.emb.weight"].shape[0] == 2 * add.state_dict()["mid.0.emb.weight"].shape[0]
