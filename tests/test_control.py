"""Control: guidance wrappers, slerp, inversion, SDEdit, RePaint inpainting, repair, combine, and their CLI.

Maths is checked with the exact denoiser for Gaussian data (see test_samplers.py); the image-level
functions run on a tiny untrained model built in-process. An untrained v-prediction network
outputs v ≈ 0, i.e. x̂0 ≈ sqrt(ᾱ_t) x_t: close to the exact denoiser of N(0, I) latents, which is
why DDIM inversion is nearly exact even on it.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main as cli
from latentdiff.diffusion.denoiser import prediction_from_output
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import ConfigError, DataError
from latentdiff.evaluation.metrics import psnr
from latentdiff.guidance.cfg import blend
from latentdiff.guidance.gradient import brightness, decoded, region_mean, user_guidance
from latentdiff.pipeline import LatentDiffusion, control
from latentdiff.pipeline import inpaint as inpaint_mod
from latentdiff.pipeline.config import load_config
from latentdiff.sampling.grids import timesteps
from latentdiff.sampling.samplers import ddim
from latentdiff.utils.images import to_tensor

MU, S_DATA = 0.8, 0.35


def exact_denoiser(schedule, mu=MU, s=S_DATA):
    """E[x0 | x_t] for x0 ~ N(mu, s²) per dimension: mu + a s² / (a² s² + σ²) (x_t - a mu)."""
    def fn(xt, t):
        abar = schedule.abar(t).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
        a, var = abar.sqrt(), 1 - abar
        x0 = mu + a * s**2 / (a**2 * s**2 + var) * (xt - a * mu)
        return prediction_from_output(x0, xt, schedule.abar(t), "x0")
    return fn


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.create("linear", 1000)


_CODEC: dict = {}


def tiny_pipe(num_classes=3, *overrides):
    """Tiny untrained denoiser; its autoencoder is fitted to blob images for a second, so that decoded
    images respond to their latents as a trained codec's do (a random decoder barely does)."""
    cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={num_classes}", *overrides])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), tuple(f"c{i}" for i in range(num_classes)))
    for p in pipe.denoiser.parameters():  # zero-initialised output layers would make every sample equal
        p.data.add_(0.01 * torch.randn_like(p))
    if not _CODEC:
        x = to_tensor(blobs(8, seed=10))
        opt = torch.optim.Adam(pipe.autoencoder.parameters(), lr=5e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(15):
            loss = pipe.autoencoder.loss(x, generator=g)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        pipe.autoencoder.fit_latent_stats(x)
        _CODEC.update({k: v.clone() for k, v in pipe.autoencoder.state_dict().items()})
    pipe.autoencoder.load_state_dict(_CODEC)
    return pipe.eval()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def blobs(n=2, seed=0):
    """Smooth grey test images, uint8 n×28×28×1: a bright ellipse on a darker background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(5, 9), rng.uniform(4, 8)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out.append(np.clip(60 + 140 * np.exp(-inside), 0, 255))
    return np.stack(out).astype(np.uint8)[..., None]


# --- guidance -----------------------------------------------------------------------------------


def _guided_mean(sched, scale, target, n=4000):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    objective = lambda x0: -((x0 - target) ** 2).flatten(1).sum(1)  # noqa: E731
    fn = user_guidance(exact_denoiser(sched), objective, scale, sched)
    return ddim(fn, x, sched, timesteps(1000, 50)).mean().item()


def test_user_guidance_moves_samples_towards_the_target(sched):
    target = -0.5
    m0, m1, m2 = (_guided_mean(sched, s, target) for s in (0.0, 1.0, 2.0))
    assert m0 == pytest.approx(MU, abs=0.02)  # unguided: the data mean
    assert target < m2 < m1 - 0.05 < m0 - 0.1  # guided: towards the target, more with a larger scale


def test_user_guidance_formula_and_scale_zero(sched):
    den = exact_denoiser(sched)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 500, 200, 50, 3])
    objective = lambda x0: -((x0 - 0.1) ** 2).flatten(1).sum(1)  # noqa: E731
    base = den(x, t)
    zero = user_guidance(den, objective, 0.0, sched)(x, t)
    assert torch.equal(zero.x0, base.x0) and torch.equal(zero.eps, base.eps)
    out = user_guidance(den, objective, 0.7, sched)(x, t)
    abar = sched.abar(t).reshape(-1, 1, 1, 1)
    # here x̂0 is affine in x_t, so ∇_{x_t} f = -2 (x̂0 - 0.1) · ∂x̂0/∂x_t with ∂x̂0/∂x_t = a s² / (a² s² + σ²)
    grad = -2 * (base.x0 - 0.1) * abar.sqrt() * S_DATA**2 / (abar * S_DATA**2 + 1 - abar)
    torch.testing.assert_close(out.x0, base.x0 + 0.7 * (1 - abar) / abar.sqrt() * grad)
    torch.testing.assert_close(abar.sqrt() * out.x0 + (1 - abar).sqrt() * out.eps, x)  # still consistent with x_t
    with pytest.raises(ConfigError, match="one score per sample"):
        user_guidance(den, lambda x0: x0.sum(), 1.0, sched)(x, t)


def test_decoded_brightness_guidance_brightens(pipe):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    noise = torch.randn(4, *pipe.autoencoder.latent_shape, generator=g())
    ts = timesteps(100, 10)
    base = pipe.denoiser.bind(None)
    plain = pipe.autoencoder.from_latent(ddim(base, noise, pipe.denoiser.schedule, ts))
    fn = user_guidance(base, decoded(pipe.autoencoder, brightness(1.0)), 50.0, pipe.denoiser.schedule)
    bright = pipe.autoencoder.from_latent(ddim(fn, noise, pipe.denoiser.schedule, ts))
    gain = bright.flatten(1).mean(1) - plain.flatten(1).mean(1)  # the barely trained codec responds weakly
    assert (gain > 0).all() and gain.mean() > 0.005


def test_blend_mixes_two_conditionings(sched):
    d1, d2 = exact_denoiser(sched, mu=-1.0), exact_denoiser(sched, mu=2.0)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([800, 300, 10])
    p1, p2 = d1(x, t), d2(x, t)
    assert torch.equal(blend(d1, d2, 0.0)(x, t).x0, p1.x0)
    out = blend(d1, d2, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))(x, t)
    torch.testing.assert_close(out.x0[1], 0.75 * p1.x0[1] + 0.25 * p2.x0[1])
    torch.testing.assert_close(out.eps[2], p2.eps[2])


def test_image_objectives():
    x = torch.zeros(2, 1, 4, 6)
    x[1, :, 1:3, 2:5] = 1.0
    torch.testing.assert_close(brightness(0.5)(x), torch.tensor([-0.25, -(6 / 24 - 0.5) ** 2]))
    torch.testing.assert_close(region_mean((2, 1, 5, 3), 1.0)(x), torch.tensor([-1.0, 0.0]))
    with pytest.raises(ConfigError, match="outside"):
        region_mean((0, 0, 7, 2), 0.0)(x)


# --- slerp ----------------------------------------------------------------------------------------


def test_slerp_endpoints_norms_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    b = b / b.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    assert torch.equal(control.slerp(a, b, 0.0), a) and torch.equal(control.slerp(a, b, 1.0), b)
    for t in (0.1, 0.5, 0.77):
        mid = control.slerp(a, b, t)
        torch.testing.assert_close(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))
    # the angle is split in proportion to t
    ang = lambda u, v: torch.arccos(torch.nn.functional.cosine_similarity(u.flatten(1), v.flatten(1)))  # noqa: E731
    mid = control.slerp(a, b, 0.25)
    torch.testing.assert_close(ang(a, mid), 0.25 * ang(a, b), rtol=1e-4, atol=1e-5)
    # a per-sample t
    per = control.slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(per[0], a[0]) and torch.equal(per[2], b[2])
    # unlike lerp, the midpoint of two independent Gaussian vectors keeps their norm
    assert (0.5 * (a + b)).flatten(1).norm(dim=1).max() < 0.9 * a.flatten(1).norm(dim=1).min()
    with pytest.raises(ConfigError, match="one shape"):
        control.slerp(a, b[:2], 0.5)


def test_slerp_falls_back_to_lerp_when_parallel():
    a = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for b in (2 * a, 2 * a + 1e-9, -a):  # parallel, nearly parallel, anti-parallel
        out = control.slerp(a, b, 0.3)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, 0.7 * a + 0.3 * b)


# --- masks and inpainting -----------------------------------------------------------------------


def test_latent_mask_any_pooling():
    mask = np.zeros((1, 28, 28), dtype=bool)
    mask[0, 5, 9] = True  # pixel (y=5, x=9) lies in the 4×4 cell (1, 2)
    m = inpaint_mod.latent_mask(mask, 4, (7, 7))
    assert m.shape == (1, 1, 7, 7) and m.sum() == 1 and m[0, 0, 1, 2] == 1
    odd = np.zeros((1, 30, 30), dtype=bool)  # 30 px -> ceil(30/4) = 8 cells; the last cell is half image
    odd[0, 29, 29] = True
    m = inpaint_mod.latent_mask(odd, 4, (8, 8))
    assert m.shape == (1, 1, 8, 8) and m.sum() == 1 and m[0, 0, 7, 7] == 1


def test_repaint_keeps_known_and_samples_unknown_from_the_data(sched):
    """Independent Gaussian dimensions: the known one is returned exactly, the unknown one ~ N(MU, S²)."""
    n = 2000
    known = torch.full((n, 1, 1, 2), -1.25, dtype=torch.float64)
    m = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    # Strided ancestral steps lose some variance (see test_samplers.py), more so on coarse grids.
    for resample, steps, rel in ((0, 1000, 0.03), (1, 250, 0.08)):
        z = inpaint_mod.inpaint_latent(sched, exact_denoiser(sched), known, m, timesteps(1000, steps), resample=resample,
                                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(z[..., 0], known[..., 0])
        assert z[..., 1].mean().item() == pytest.approx(MU, abs=0.03)
        assert z[..., 1].std().item() == pytest.approx(S_DATA, rel=rel)


def test_inpaint_pastes_known_pixels_and_regenerates_the_hole(pipe):
    images = blobs(2)
    mask = np.zeros((28, 28), dtype=bool)
    mask[8:16, 10:20] = True
    out = inpaint_mod.inpaint(pipe, images, mask, steps=10, seed=1, labels=[0, 1])
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out[:, ~mask], images[:, ~mask])  # known pixels byte-identical
    assert not np.array_equal(out[:, mask], images[:, mask])
    again = inpaint_mod.inpaint(pipe, images, mask, steps=10, seed=1, labels=[0, 1], resample=1)
    assert np.array_equal(again[:, ~mask], images[:, ~mask])
    # an empty mask regenerates nothing: the decoded latent is the codec's reconstruction exactly
    empty = np.zeros((28, 28), dtype=bool)
    raw = inpaint_mod.inpaint(pipe, images, empty, steps=5, seed=1, paste_back=False)
    assert np.array_equal(raw, control.reconstruct(pipe, images))
    assert np.array_equal(inpaint_mod.inpaint(pipe, images, empty, steps=5), images)
    with pytest.raises(DataError, match="mask must be 28×28"):
        inpaint_mod.inpaint(pipe, images, np.zeros((20, 28), dtype=bool))


def test_damage_mask_finds_specks_and_scratches():
    clean = blobs(1, seed=4)
    assert not inpaint_mod.damage_mask(clean).any()
    damaged = clean.copy()
    specks = [(3, 3), (20, 5), (14, 14), (25, 22)]
    for y, x in specks:
        damaged[0, y, x, 0] = 255 if (y + x) % 2 else 0
    damaged[0, 22, 6:20, 0] = 250  # a thin bright horizontal scratch
    mask = inpaint_mod.damage_mask(damaged)[0]
    for y, x in specks:
        assert mask[y, x], (y, x)
    assert mask[22, 6:20].all()
    assert mask.sum() < 4 * 9 + 16 * 3 + 10  # the dilated damage, little else


# --- inversion, interpolation, img2img, combine ------------------------------------------------


def test_ddim_inversion_round_trip(pipe):
    images = blobs(2)
    noise = control.invert(pipe, images, steps=25, labels=[0, 2])
    assert noise.shape == (2, *pipe.autoencoder.latent_shape)
    fn, ts = control.bound_denoiser(pipe, pipe.request(2, labels=[0, 2], guidance=1.0)), timesteps(100, 25)
    z0 = control.encode_images(pipe, images)
    rel = lambda z: ((z - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)).max().item()  # noqa: E731
    back = ddim(fn, noise, pipe.denoiser.schedule, ts)
    assert rel(back) < 0.05  # first-order error of the inversion: 0.03 at 25 steps, 0.017 at 50
    assert rel(ddim(fn, torch.randn_like(noise), pipe.denoiser.schedule, ts)) > 0.5  # a wrong noise does not
    assert psnr(control.decode_latents(pipe, back), control.reconstruct(pipe, images)).min() > 40  # dB (measured: 54)


def test_interpolate_images_ends_reconstruct_and_seeds_match_generate(pipe):
    a, b = blobs(2)[:1], blobs(2)[1:]
    frames = control.interpolate_images(pipe, a, b, 4, steps=25)
    assert frames.shape == (4, 28, 28, 1)
    assert psnr(frames[:1], control.reconstruct(pipe, a))[0] > 35
    assert psnr(frames[3:], control.reconstruct(pipe, b))[0] > 35
    seeds = control.interpolate_seeds(pipe, 5, 6, 3, classes=1, guidance=2.0, steps=4)
    for frame, seed in ((seeds[0], 5), (seeds[2], 6)):
        ref, _ = pipe.generate(1, seed=seed, labels=1, guidance=2.0, steps=4, sampler="ddim")
        assert np.abs(frame.astype(int) - ref[0].astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="frames"):
        control.interpolate_seeds(pipe, 1, 2, 1)


def test_img2img_strength_limits():
    zts = tiny_pipe(3, "diffusion.zero_terminal_snr=true")  # ᾱ_{T-1} = 0: strength 1 sees no input at all
    images = blobs(2)
    recon = control.reconstruct(zts, images)
    low = control.img2img(zts, images, 0.01, steps=100, seed=0)  # one step, from t = 0
    assert psnr(low, recon).min() > 30
    assert not np.array_equal(low, recon)
    same = control.img2img(zts, images[:1], 1.0, steps=5, seed=0)
    other = control.img2img(zts, images[1:], 1.0, steps=5, seed=0)
    assert np.array_equal(same, other)  # strength 1 ignores the input
    mid_a = control.img2img(zts, images[:1], 0.5, steps=5, seed=0)
    mid_b = control.img2img(zts, images[1:], 0.5, steps=5, seed=0)
    assert not np.array_equal(mid_a, mid_b)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="strength"):
            control.img2img(zts, images, bad)


def test_class_arithmetic_adds_the_mean_difference(pipe):
    images = blobs(2)
    means = control.class_means(pipe, n_per_class=4, steps=2)
    assert means.shape == (3, *pipe.autoencoder.latent_shape)
    same = control.class_arithmetic(pipe, images, 1, 1, means=means)
    assert np.array_equal(same, control.reconstruct(pipe, images))
    moved = control.class_arithmetic(pipe, images, 2, 0, means=means)
    assert np.array_equal(moved, control.decode_latents(pipe, control.encode_images(pipe, images) + 1.0 * (means[2] - means[0])))
    assert not np.array_equal(moved, same)
    with pytest.raises(ConfigError, match="class must be between"):
        control.class_arithmetic(pipe, images, 5, 0, means=means)


def test_combine_normalises_and_validates_weights(pipe):
    images = blobs(2)
    a = control.combine(pipe, images, [1, 1], 0.3, seed=2, steps=10)
    b = control.combine(pipe, images, [3, 3], 0.3, seed=2, steps=10)
    assert a.shape == (1, 28, 28, 1) and np.array_equal(a, b)
    twice = control.combine(pipe, np.concatenate([images[:1]] * 2), [1, 3], 0.3, seed=2, steps=10)
    single = control.img2img(pipe, images[:1], 0.3, seed=2, steps=10)
    assert np.abs(twice.astype(int) - single.astype(int)).max() <= 1
    for weights, needle in (([1], "one weight per image"), ([1, 2, 3], "one weight per image"),
                            ([1, -1], "positive"), ([0, 1], "positive"), ([1, float("nan")], "positive")):
        with pytest.raises(ConfigError, match=needle):
            control.combine(pipe, images, weights, 0.5)


# --- CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_pipe(3).save(d)
    return d


@pytest.fixture
def run(capsys):
    """`latentdiff ARGS` in-process: (exit code, stdout, stderr)."""
    def go(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return go


def _write(path, array, mode="L"):
    Image.fromarray(array, mode).save(path)
    return path


def test_cli_edit_inpaint_repair_combine(model_dir, tmp_path, run):
    img = blobs(2)
    a, b = _write(tmp_path / "a.png", img[0, ..., 0]), _write(tmp_path / "b.png", img[1, ..., 0])
    m = ["--model", model_dir, "--steps", 5]
    code, out, err = run("edit", a, "--strength", 0.5, "--class", 1, "--out", tmp_path / "e.png", *m)
    assert code == 0, err
    edited = Image.open(tmp_path / "e.png")
    assert edited.mode == "L" and edited.size == (28, 28)
    assert '"command": "edit"' in edited.text["latentdiff"] and '"strength": 0.5' in edited.text["latentdiff"]

    code, _, err = run("inpaint", a, "--rect", "4,6,20,14", "--resample", 1, "--out", tmp_path / "i.png", *m)
    assert code == 0, err
    res = np.asarray(Image.open(tmp_path / "i.png"))
    hole = np.zeros((28, 28), dtype=bool)
    hole[6:14, 4:20] = True
    assert np.array_equal(res[~hole], img[0, ..., 0][~hole])
    _write(tmp_path / "mask.png", (hole * 255).astype(np.uint8))
    code, _, err = run("inpaint", a, "--mask", tmp_path / "mask.png", "--out", tmp_path / "i2.png", *m)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i2.png"))[~hole], img[0, ..., 0][~hole])

    damaged = img[0, ..., 0].copy()
    damaged[3, 3], damaged[20, 22] = 255, 0
    code, out, err = run("repair", _write(tmp_path / "d.png", damaged), "--out", tmp_path / "r.png", *m)
    assert code == 0, err
    assert "repaired" in out
    repaired = np.asarray(Image.open(tmp_path / "r.png"))
    assert repaired[3, 3] != 255 or repaired[20, 22] != 0
    assert (repaired == damaged).mean() > 0.9  # undamaged pixels are copied

    code, _, err = run("combine", a, b, "--weights", "1,3", "--strength", 0.4, "--out", tmp_path / "c.png", *m)
    assert code == 0, err
    assert '"weights": [0.25, 0.75]' in Image.open(tmp_path / "c.png").text["latentdiff"]

    # an RGB image twice the size: converted to L and resized, with one warning line
    rgb = np.repeat(np.kron(img[0], np.ones((2, 2, 1), dtype=np.uint8)), 3, axis=2)
    code, _, err = run("edit", _write(tmp_path / "big.png", rgb, "RGB"), "--out", tmp_path / "e2.png", *m)
    assert code == 0 and err.count("\n") == 1 and "resized big.png from 56×56 to 28×28" in err


def test_cli_interpolate_writes_strip_and_gif(model_dir, tmp_path, run):
    a = _write(tmp_path / "a.png", blobs(1)[0, ..., 0])
    code, out, err = run("interpolate", a, "seed:3", "--frames", 3, "--model", model_dir, "--steps", 5,
                         "--out", tmp_path / "s.png")
    assert code == 0, err
    strip = Image.open(tmp_path / "s.png")
    assert strip.size == (3 * 28 + 4 * 2, 28 + 2 * 2)
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames == 3 and gif.size == (28, 28)
    code, _, err = run("interpolate", "seed:1", "seed:2", "--class", "0,2", "--frames", 2, "--model", model_dir,
                       "--steps", 3, "--out", tmp_path / "t.png")
    assert code == 0, err


@pytest.mark.parametrize("args,needle", [
    (["edit", "{a}", "--strength", "0"], "--strength: must be in (0, 1]"),
    (["edit", "{a}", "--strength", "1.5"], "--strength: must be in (0, 1]"),
    (["edit", "{a}", "--class", "7"], "class must be between 0 and 2"),
    (["edit", "{a}", "--out", "{tmp}/x.jpg"], "--out must end in .png"),
    (["edit", "{tmp}/missing.png"], "image file not found"),
    (["edit", "{wide}"], "aspect ratio differs"),
    (["edit", "{a}", "--model", "{tmp}/nope"], "model directory not found"),
    (["interpolate", "{a}", "seed:1", "--frames", "1"], "--frames: must be between 2 and 1000"),
    (["interpolate", "{a}", "seed:x"], "expected seed:INTEGER"),
    (["combine", "{a}", "{a}", "--weights", "1,-1"], "--weights: every weight must be a positive"),
    (["combine", "{a}", "{a}", "--weights", "1,2,3"], "--weights has 3 values for 2 images"),
    (["combine", "{a}"], "at least two images"),
    (["inpaint", "{a}"], "one of the arguments --mask --rect --span is required"),
    (["inpaint", "{a}", "--rect", "0,0,40,5"], "reaches outside the 28×28 image"),
    (["inpaint", "{a}", "--rect", "5,5,2,9"], "need 0 <= x0 < x1"),
    (["inpaint", "{a}", "--mask", "{small}"], "must be the same size"),
    (["inpaint", "{a}", "--mask", "{black}"], "the mask is empty"),
    (["repair", "{a}", "--resample", "-1"], "--resample: must be >= 0"),
])
def test_cli_bad_input_one_line_exit_2(model_dir, tmp_path, run, args, needle):
    paths = {"a": _write(tmp_path / "a.png", blobs(1)[0, ..., 0]),
             "wide": _write(tmp_path / "wide.png", np.zeros((28, 40), dtype=np.uint8)),
             "small": _write(tmp_path / "small.png", np.full((14, 14), 255, dtype=np.uint8)),
             "black": _write(tmp_path / "black.png", np.zeros((28, 28), dtype=np.uint8)), "tmp": tmp_path}
    args = [a.format(**paths) for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    code, _, err = run(*args, "--steps", 2)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
