"""Training the noise-aware classifier p_φ(y | z_t, t) for classifier guidance: its stage on the shared
loop, and its held-out accuracy per noise level.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.data import SOURCES, load_dataset
from latentdiff.diffusion.schedule import NoiseSchedule
from latentdiff.errors import DataError
from latentdiff.models.classifier import ClassifierConfig, NoisyClassifier, save_classifier
from latentdiff.pipeline.config import TrainConfig
from latentdiff.training import rundir
from latentdiff.training.latents import Posteriors, encode_dataset, posterior_means, sample_posterior
from latentdiff.training.loop import Stage, TrainLoop

log = logging.getLogger(__name__)


def default_training() -> TrainConfig:
    """The classifier's training defaults (a few CPU minutes for Fashion-MNIST latents)."""
    return TrainConfig(steps=2000, batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.01, ema_decay=0.995,
                       log_every=50, checkpoint_every=250)


def data_label(source: str) -> str:
    """A description of the data source that names no path of this machine."""
    if source == "fashion-mnist":
        return "fashion-mnist (IDX)"
    if source in SOURCES:
        return source
    return f"image folder {Path(source).name}"


def noise_buckets(num_train_steps: int, n: int = 5) -> list[tuple[int, int]]:
    """`n` equal ranges [lo, hi) of timesteps covering 0 … T-1."""
    edges = np.linspace(0, num_train_steps, n + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]


@torch.no_grad()
def accuracy_by_noise(net: NoisyClassifier, z0: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                      buckets: list[tuple[int, int]], *, seed: int = 0, batch_size: int = 1000) -> list[dict]:
    """Accuracy on z_t = add_noise(z0, ε, t) with t uniform in each bucket (fixed seed): one dict per bucket."""
    net.eval()
    gen = torch.Generator(device=z0.device).manual_seed(seed)
    out = []
    for lo, hi in buckets:
        correct = 0
        for i in range(0, len(z0), batch_size):
            z = z0[i:i + batch_size]
            t = torch.randint(lo, hi, (len(z),), generator=gen, device=z.device)
            eps = torch.randn(z.shape, generator=gen, device=z.device)
            pred = net(schedule.add_noise(z, eps, t), t).argmax(1)
            correct += int((pred == labels[i:i + batch_size]).sum())
        snr = schedule.alpha_bar / (1 - schedule.alpha_bar)
        out.append({"t": [lo, hi - 1], "snr": [float(f"{snr[hi - 1]:.4g}"), float(f"{snr[lo]:.4g}")],
                    "accuracy": round(correct / len(z0), 4), "n": len(z0)})
    return out


def classifier_stage(net: NoisyClassifier, schedule: NoiseSchedule, post: Posteriors, labels: torch.Tensor,
                     train: TrainConfig) -> Stage:
    """Cross-entropy of the labels of z_t = add_noise(z0, ε, t), t ~ U{0, …, T-1}: a per-sample loss."""

    def loss(idx, gen, rows):
        # draws cover the global batch (as for the denoiser), the network sees this process's rows only
        idx = idx.to(post.mean.device)
        z0 = sample_posterior(post, idx, gen)
        t = torch.randint(schedule.num_steps, (len(idx),), generator=gen, device=z0.device)
        eps = torch.randn(z0.shape, generator=gen, device=z0.device)
        y, t = labels[idx][rows], t[rows]
        logits = net(schedule.add_noise(z0[rows], eps[rows], t), t)
        acc = (logits.argmax(1) == y).float().mean()
        return F.cross_entropy(logits.float(), y, reduction="none"), {"acc": acc}

    return Stage("classifier", net, loss, len(post), train)


def train_classifier(pipe, run_dir: str | Path, out: str | Path, *, source: str | None = None, data_dir=None,
                     train: TrainConfig | None = None, cfg: ClassifierConfig | None = None, device="cpu",
                     dtype: torch.dtype = torch.float32, resume: bool = False, overwrite: bool = False, limit: int | None = None,
                     eval_limit: int | None = None, progress: bool = True) -> tuple[NoisyClassifier, dict]:
    """Train a noise-aware classifier on the latents of `pipe`'s autoencoder; write it to `out`.

    `source` defaults to the model's training data. Accuracy is then measured per noise bucket on
    the held-out split (or on training images for an image folder without one), with the weights
    exactly as saved (after the cast to `dtype`).
    """
    device = torch.device(device)
    train = train or default_training()
    train.validate("classifier training")
    source = source or pipe.cfg.data.source
    data = load_dataset(source, "train", data_dir=data_dir, limit=limit)
    if data.labels is None or data.num_classes < 2:
        raise DataError(f"{data.source} has no class labels: a classifier needs labelled data "
                        "(an image folder with one subfolder per class)")
    c, h, w = pipe.image_shape
    if data.images.shape[1:] != (h, w, c):
        raise DataError(f"the data ({'×'.join(map(str, data.images.shape[1:]))}, H×W×C) does not match the "
                        f"model's images ({h}×{w}×{c})")
    cfg = cfg or ClassifierConfig()
    cfg = dataclasses.replace(cfg, in_channels=pipe.autoencoder.cfg.latent_channels, num_classes=data.num_classes)
    net = NoisyClassifier(cfg)
    schedule = pipe.denoiser.schedule
    ae = pipe.autoencoder.to(device).eval()
    log.info(f"classifier: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(data)} images "
             f"from {data_label(source)}, {data.num_classes} classes, latent {ae.latent_shape}")
    post = encode_dataset(ae, data.images, device)
    labels = torch.as_tensor(data.labels, device=device)
    config = {"classifier": dataclasses.asdict(cfg), "training": dataclasses.asdict(train)}
    stage = classifier_stage(net, schedule, post, labels, train)
    with rundir.locked(Path(run_dir)):
        final = TrainLoop(stage, Path(run_dir), device, config=config, progress=progress,
                          overwrite=overwrite).run(resume)

    # Measure exactly what is shipped: the weights after the cast to `dtype`.
    shipped = NoisyClassifier(cfg).to(device)
    shipped.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v
                             for k, v in final.state_dict().items()})
    has_test = source in SOURCES or (Path(source) / "test").is_dir()
    test = load_dataset(source, "test" if has_test else "train", data_dir=data_dir, limit=eval_limit)
    held_out = "test split" if has_test else "training images (no held-out split)"
    z0_test = posterior_means(encode_dataset(ae, test.images, device))
    buckets = accuracy_by_noise(shipped, z0_test, torch.as_tensor(test.labels, device=device), schedule,
                                noise_buckets(schedule.num_steps))
    meta = {"latent_shape": list(ae.latent_shape), "num_train_steps": schedule.num_steps,
            "latent_stats": ae.latent_stats(), "class_names": list(data.class_names),
            "data_source": data_label(source), "train_images": len(data), "train_steps": train.steps,
            "batch_size": train.batch_size, "lr": train.lr, "ema_decay": train.ema_decay,
            "evaluated_on": f"{data_label(source)}, {held_out} ({len(test)} images, posterior means)",
            "accuracy_by_noise": buckets}
    save_classifier(shipped, out, meta, dtype)
    log.info("held-out accuracy by noise level: " + ", ".join(f"t {b['t'][0]}-{b['t'][1]}: {b['accuracy']:.3f}"
                                                          for b in buckets))
    log.info(f"wrote {out}")
    return shipped.eval().requires_grad_(False), meta
