"""Noise-aware classifier and classifier guidance: the gradient shift in closed form, composition with
classifier-free guidance, a training smoke test, and the CLI paths."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main as cli
from latentdiff.data import load_dataset
from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import prediction_from_output
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import DataError, ModelError
from latentdiff.guidance.cfg import classifier_free
from latentdiff.guidance.gradient import classifier_guidance
from latentdiff.models.classifier import ClassifierConfig, NoisyClassifier, load_classifier, save_classifier
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import TrainConfig, load_config
from latentdiff.sampling.grids import timesteps
from latentdiff.sampling.samplers import ddim
from latentdiff.training.classifier import accuracy_by_noise, noise_buckets, train_classifier
from latentdiff.utils.images import to_tensor


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.create("linear", 1000)


def gaussian_classifier(sched, means):
    """logits_k(x_t, t) = -||x_t - sqrt(ᾱ_t) m_k||² / 2, so ∇_{x_t} log p(y|x_t) = sqrt(ᾱ_t) (m_y - Σ_k p_k m_k)."""
    def clf(x, t):
        a = sched.abar(t).to(x.dtype).sqrt().reshape(-1, 1, 1)  # (B, 1, 1)
        d = x.flatten(1)[:, None, :] - a * means.flatten(1)[None]  # (B, K, D)
        return -0.5 * d.square().sum(-1)
    return clf


def shrink_denoiser(sched, c=0.5):
    """A stand-in denoiser: x̂0 = c · x_t."""
    return lambda xt, t: prediction_from_output(c * xt, xt, sched.abar(t), "x0")


def test_classifier_guidance_shift_in_closed_form(sched):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=g)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([950, 600, 250, 20])
    y = torch.tensor([0, 2, 1, 2])
    den, clf = shrink_denoiser(sched), gaussian_classifier(sched, means)
    base = den(x, t)
    assert classifier_guidance(den, clf, y, 0.0, sched) is den
    out = classifier_guidance(den, clf, y, 1.7, sched)(x, t)

    abar = sched.abar(t).to(torch.float64).reshape(-1, 1, 1, 1)
    p = torch.softmax(clf(x, t), -1)  # (B, K)
    grad = abar.sqrt() * (means[y] - torch.einsum("bk,kchw->bchw", p, means))  # ∇ log p(y | x_t)
    sigma = (1 - abar).sqrt()
    torch.testing.assert_close(out.eps, base.eps - 1.7 * sigma * grad)  # Dhariwal & Nichol eq. 14
    torch.testing.assert_close(out.x0, base.x0 + 1.7 * sigma**2 / abar.sqrt() * grad)
    torch.testing.assert_close(abar.sqrt() * out.x0 + sigma * out.eps, x)  # still consistent with x_t
    # the opposite sign (pushing away from the class) is far from it
    assert (out.eps - (base.eps + 1.7 * sigma * grad)).abs().max() > 0.1


def test_classifier_guidance_moves_samples_to_the_class(sched):
    """Data N(0, 1) in 1-D, a classifier between classes at ±1: guidance towards class 0 (+1) raises the mean."""
    means = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1)

    def den(xt, t):  # E[x0 | x_t] = sqrt(ᾱ_t) x_t for x0 ~ N(0, 1)
        return prediction_from_output(sched.abar(t).to(xt.dtype).sqrt().reshape(-1, 1, 1, 1) * xt, xt,
                                      sched.abar(t), "x0")

    x = torch.randn(3000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3000, dtype=torch.long)
    clf = gaussian_classifier(sched, means)
    m = [ddim(classifier_guidance(den, clf, y, s, sched), x, sched, timesteps(1000, 25)).mean().item()
         for s in (0.0, 1.0, 3.0)]
    assert abs(m[0]) < 0.06 and m[0] + 0.1 < m[1] < m[2] - 0.1


# --- a tiny model -----------------------------------------------------------------------------


def tiny_pipe(num_classes=10):
    cfg = load_config(preset="tiny", overrides=[f"unet.num_classes={num_classes}"])
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(cfg, (28, 28), tuple(f"c{i}" for i in range(num_classes)))
    for p in pipe.denoiser.parameters():  # zero-initialised output layers would make every sample equal
        p.data.add_(0.01 * torch.randn_like(p))
    return pipe.eval()


def random_classifier(pipe, num_classes=10):
    torch.manual_seed(1)
    net = NoisyClassifier(ClassifierConfig(in_channels=pipe.autoencoder.cfg.latent_channels, base_channels=16,
                                           num_res_blocks=1, num_classes=num_classes))
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return net.eval().requires_grad_(False)


def test_composes_with_classifier_free_guidance():
    pipe = tiny_pipe()
    sched, clf = pipe.denoiser.schedule, random_classifier(pipe)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, *pipe.autoencoder.latent_shape, generator=g)
    t = torch.tensor([90, 40, 5])
    y = torch.tensor([1, 4, 9])
    cfg_fn = classifier_free(pipe.denoiser, Cond(labels=y), 2.5)
    with torch.no_grad():
        base = cfg_fn(x, t)
        out = classifier_guidance(cfg_fn, clf, y, 1.5, sched)(x, t)
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(clf(xr, t), -1)[torch.arange(3), y]
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    assert grad.abs().max() > 0
    sigma = (1 - sched.abar(t)).sqrt().float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.eps, base.eps - 1.5 * sigma * grad)
    # classifier scale 0 with CFG scale 1 is the conditional model
    plain = classifier_guidance(classifier_free(pipe.denoiser, Cond(labels=y), 1.0), clf, y, 0.0, sched)(x, t)
    torch.testing.assert_close(plain.x0, pipe.denoiser(x, t, Cond(labels=y)).x0)

    pipe.classifier = clf
    a, _ = pipe.generate(4, labels=[0, 1, 2, 3], steps=3, seed=5, guidance=2.0)
    b, _ = pipe.generate(4, labels=[0, 1, 2, 3], steps=3, seed=5, guidance=2.0, classifier_scale=0.0)
    c, _ = pipe.generate(4, labels=[0, 1, 2, 3], steps=3, seed=5, guidance=2.0, classifier_scale=30.0)
    d, _ = pipe.generate(4, labels=[0, 1, 2, 3], steps=3, seed=5, guidance=2.0, classifier_scale=30.0)
    assert np.array_equal(a, b) and np.array_equal(c, d) and not np.array_equal(a, c)


def test_classifier_guidance_on_an_unconditional_model():
    pipe = tiny_pipe(num_classes=0)
    pipe.classifier = random_classifier(pipe)
    images, labels = pipe.generate(2, labels=[3, 7], steps=2, classifier_scale=5.0)
    assert images.shape == (2, 28, 28, 1) and list(labels) == [3, 7]
    with pytest.raises(Exception, match="class must be between 0 and 9"):
        pipe.generate(1, labels=[10], steps=2, classifier_scale=1.0)
    with pytest.raises(Exception, match="needs the classes"):
        pipe.generate(1, steps=2, classifier_scale=1.0)


def test_noise_buckets_cover_all_timesteps():
    b = noise_buckets(1000)
    assert b[0] == (0, 200) and b[-1] == (800, 1000) and all(b[i][1] == b[i + 1][0] for i in range(4))


# --- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained for seconds on the bundled data through a random (untrained) codec."""
    d = tmp_path_factory.mktemp("clf")
    pipe = tiny_pipe()
    out = pipe.autoencoder.encoder.net[-1]  # a random codec, but with a narrow posterior and unit-scale latents
    c = pipe.autoencoder.cfg.latent_channels
    with torch.no_grad():
        out.weight[c:] = 0.0
        out.bias[c:] = -8.0  # log σ² of the posterior
    pipe.autoencoder.fit_latent_stats(to_tensor(load_dataset("bundled", "train", limit=500).images))
    pipe.save(d / "model")
    pipe = LatentDiffusion.load(d / "model")
    train = TrainConfig(steps=120, batch_size=64, lr=3e-3, warmup_steps=10, ema_decay=0.9, log_every=40,
                        checkpoint_every=60)
    net, meta = train_classifier(pipe, d / "run", d / "model" / "classifier.safetensors", source="bundled",
                                 limit=2000, eval_limit=500, train=train, progress=False,
                                 cfg=ClassifierConfig(base_channels=16, num_res_blocks=1))
    return d, pipe, net, meta


def test_training_beats_chance_at_low_noise(trained):
    d, _, _, meta = trained
    acc = [b["accuracy"] for b in meta["accuracy_by_noise"]]
    assert acc[0] > 0.3  # chance is 0.1
    assert acc[0] > acc[-1]  # nearly pure noise carries almost no class information
    assert meta["data_source"] == "bundled" and "test split" in meta["evaluated_on"]
    assert (d / "run" / "checkpoints").is_dir()
    header = json.loads((d / "model" / "classifier.json").read_text())
    assert header["accuracy_by_noise"] == meta["accuracy_by_noise"]


def test_saved_classifier_round_trip_and_compatibility(trained, tmp_path):
    _, pipe, net, meta = trained
    loaded = pipe.load_classifier()
    x, t = torch.randn(5, *pipe.autoencoder.latent_shape), torch.tensor([0, 10, 50, 90, 99])
    torch.testing.assert_close(loaded(x, t), net(x, t))
    again = accuracy_by_noise(loaded, torch.zeros(4, *pipe.autoencoder.latent_shape), torch.zeros(4, dtype=torch.long),
                              pipe.denoiser.schedule, noise_buckets(100, 2))
    assert [b["t"] for b in again] == [[0, 49], [50, 99]]
    other = {k: v for k, v in meta.items() if k != "latent_stats"}
    for stats in ({"latent_stats": {"shift": meta["latent_stats"]["shift"], "scale": [3.0] * len(meta["latent_stats"]["scale"])}},
                  {"scale_factor": 3.0}):  # the per-channel header, and the one-scale header of older files
        save_classifier(net, tmp_path / "other.safetensors", {**other, **stats})
        with pytest.raises(ModelError, match="another autoencoder"):
            pipe.load_classifier(tmp_path / "other.safetensors")
    save_classifier(net, tmp_path / "t.safetensors", {**meta, "num_train_steps": 1000})
    with pytest.raises(ModelError, match="T = 1000"):
        pipe.load_classifier(tmp_path / "t.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelError):
        load_classifier(tmp_path / "bad.safetensors")


def test_training_needs_labels(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8), "L").save(folder / f"{i}.png")
    with pytest.raises(DataError, match="no class labels"):
        train_classifier(tiny_pipe(), tmp_path / "run", tmp_path / "c.safetensors", source=str(folder),
                         progress=False)


# --- CLI ----------------------------------------------------------------------------------------


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_classifier_then_sample(trained, tmp_path, capsys):
    d, *_ = trained
    model = tmp_path / "model"
    LatentDiffusion.load(d / "model").save(model)  # a copy without classifier
    code, _, err = run(capsys, "sample", "--model", model, "--classifier-scale", 1, "--n", 2, "--steps", 2,
                       "--out", tmp_path / "x.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has no classifier.safetensors" in lines[0] \
        and "latentdiff train-classifier --model" in lines[0]
    assert not (tmp_path / "x.png").exists()

    code, out, err = run(capsys, "train-classifier", "--model", model, "--data", "bundled", "--limit", 300,
                         "--steps", 3, "--batch-size", 8, "--run-dir", tmp_path / "run", "--no-progress")
    assert code == 0, err
    assert (model / "classifier.safetensors").is_file() and "held-out accuracy by noise level" in out
    code, out, err = run(capsys, "sample", "--model", model, "--classifier-scale", 2, "--n", 10, "--steps", 2,
                         "--guidance", 1, "--out", tmp_path / "s.png", "--no-progress")
    assert code == 0, err
    assert '"classifier_scale": 2.0' in Image.open(tmp_path / "s.png").text["latentdiff"]


@pytest.mark.parametrize("args,needle", [
    (["sample", "--model", "{model}", "--classifier-scale", "-1"], "--classifier-scale: must be a finite number >= 0"),
    (["sample", "--model", "{model}", "--classifier-scale", "1", "--unconditional"], "use --guidance 0"),
    (["sample", "--model", "{model}", "--classifier", "{model}/classifier.safetensors"],
     "--classifier only applies with --classifier-scale"),
    (["sample", "--model", "{model}", "--classifier-scale", "1", "--classifier", "{tmp}/none.safetensors"],
     "classifier file not found"),
    (["sample", "--model", "{model}", "--classifier-scale", "1", "--class", "12"], "class must be between 0 and 9"),
    (["train-classifier", "--model", "pretrained:fashion-mnist"], "give --out PATH"),
    (["train-classifier", "--model", "{model}", "--out", "{tmp}/c.pt"], "--out must end in .safetensors"),
    (["train-classifier", "--model", "{tmp}/missing"], "model directory not found"),
    (["train-classifier", "--model", "{model}", "--steps", "0"], "--steps: must be a positive integer"),
])
def test_cli_bad_input_one_line_exit_2(trained, tmp_path, capsys, args, needle):
    d, *_ = trained
    args = [a.format(model=d / "model", tmp=tmp_path) for a in args]
    extra = ["--out", tmp_path / "o.png"] if args[0] == "sample" else ["--run-dir", tmp_path / "r"]
    code, _, err = run(capsys, *args, *extra, "--no-progress")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o.png").exists()


# --- the network: the U-Net's down path, and files of the first architecture version ---------------

class _V1Classifier(torch.nn.Module):
    """The version-1 layout (a flat `blocks` list), kept here as the reference the shipped file was written by."""

    def __init__(self, cfg: ClassifierConfig):
        from latentdiff.nn.layers import Downsample, ResBlock, group_norm, time_mlp

        super().__init__()
        ch, emb = cfg.base_channels, 4 * cfg.base_channels
        self.cfg, self.time_mlp = cfg, time_mlp(ch, emb)
        self.conv_in = torch.nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks, cur = [], ch
        for lvl, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, emb))
                cur = ch * mult
            if lvl < len(cfg.channel_mults) - 1:
                blocks.append(Downsample(cur))
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm_out, self.head = group_norm(cur), torch.nn.Linear(cur, cfg.num_classes)

    def forward(self, x, t):
        from latentdiff.nn.layers import Downsample, timestep_embedding

        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
        return self.head(torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3)))


def test_shipped_version_1_classifier_loads_with_identical_logits():
    from latentdiff.pipeline import model_dir
    from latentdiff.utils.state import load_state

    path = model_dir("pretrained:fashion-mnist") / "classifier.safetensors"
    tensors, meta = load_state(path)
    assert meta["architecture_version"] == 1 and any(k.startswith("blocks.") for k in tensors)
    net, _ = load_classifier(path)
    ref = _V1Classifier(net.cfg)
    ref.load_state_dict({k: v.float() for k, v in tensors.items()})  # strict: every v1 name is used
    x = torch.randn(6, net.cfg.in_channels, 7, 7, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 200, 500, 900, 999])
    with torch.no_grad():
        assert torch.equal(net(x, t), ref.eval()(x, t))


def test_same_seed_same_initial_weights_as_version_1(tmp_path):
    """The down path is created in the old order: a classifier trained from scratch starts where it did."""
    cfg = ClassifierConfig(base_channels=16, num_res_blocks=1)
    torch.manual_seed(3)
    old = _V1Classifier(cfg)
    torch.manual_seed(3)
    new = NoisyClassifier(cfg)
    from latentdiff.models.classifier import upgrade_state_dict

    assert upgrade_state_dict(old.state_dict(), new, 1).keys() == new.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    save_classifier(new, tmp_path / "c.safetensors", {})
    loaded, meta = load_classifier(tmp_path / "c.safetensors")
    assert meta["architecture_version"] == 2 and all(k.startswith("down.") for k in
                                                      loaded.state_dict() if "blocks" in k or "down" in k)
