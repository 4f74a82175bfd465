"""latentdiff trained within a wall-clock budget that *includes* the autoencoder.

The budget is spent in one timed line: autoencoder training (``ae_fraction`` of the budget), the
latent scale factor and the one-off encoding of the data set into cached posteriors, then the
latent denoiser for whatever time is left. The steps are latentdiff's own: ``Autoencoder.loss``,
``train.encode_dataset``, ``train.diffusion_loss`` (min-SNR weighting), ``train.EMA``, AdamW with
betas (0.9, 0.99), gradient clipping and bf16 autocast on CUDA, as ``train.run_stage`` does. What
differs from ``latentdiff train`` is only the stopping rule (time instead of steps, so the cosine
learning-rate decay runs over the budget) and that no checkpoints are written.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from common import autocast, count_flops, lr_budget, sync, train_for

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.data import ImageData
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import PRESETS, Config
from latentdiff.training.loop import EMA, diffusion_loss, encode_dataset
from latentdiff.utils.images import to_tensor


def ld_config(size: str, conditional: bool, batch: int) -> Config:
    """``full``: the shipped model's preset (configs/fashion-mnist.yaml); ``small``: the CPU demo preset;
    ``tiny``: the test preset."""
    cfg = PRESETS[{"full": "fashion-mnist", "small": "demo", "tiny": "tiny"}[size]]()
    cfg.conditional = conditional
    cfg.training.batch_size = batch
    if not conditional:
        cfg.sample.guidance = 1.0
    return cfg


class LatentDiffusionRun:
    kind = "latentdiff"

    def __init__(self, name: str, cfg: Config, data: ImageData, device: torch.device, *, ae_fraction: float,
                 sampler: str, sample_steps: int, seed: int = 0, log=print):
        self.name, self.cfg, self.data, self.device = name, cfg, data, device
        self.ae_fraction, self.sampler, self.sample_steps, self.seed = ae_fraction, sampler, sample_steps, seed
        self.log = log
        self.conditional = cfg.conditional and data.labels is not None and data.num_classes > 1
        self.batch = cfg.training.batch_size
        self.pipe: LatentDiffusion | None = None
        self.flops: dict = {}

    def describe(self) -> dict:
        c = self.cfg
        return {"recipe": f"latentdiff preset, AdamW lr {c.training.lr:g} (autoencoder {c.autoencoder_training.lr:g}),"
                          f" warm-up {c.training.warmup_steps} steps then cosine over the budget, EMA "
                          f"{c.training.ema_decay}, {c.diffusion.prediction}-prediction, min-SNR "
                          f"{c.diffusion.min_snr_gamma:g}, autoencoder {self.ae_fraction:.0%} of the budget",
                "space": f"latent {'×'.join(map(str, c.autoencoder.latent_shape(self.data.image_size)))}",
                "conditional": self.conditional, "guidance": c.sample.guidance,
                "sampler": f"{self.sampler} {self.sample_steps} steps"}

    def _opt(self, params, lr):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), fused=self.device.type == "cuda")

    def _step(self, model, opt, loss_fn, tcfg, step, progress):
        for group in opt.param_groups:
            group["lr"] = lr_budget(step, progress, tcfg.lr, tcfg.warmup_steps, 0.1)
        with autocast(self.device):
            loss = loss_fn().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()

    def train(self, budget: float, snapshot_at=()) -> dict:
        cfg, dev = self.cfg, self.device
        torch.manual_seed(self.seed)
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        images = to_tensor(self.data.images).to(dev)  # N×C×H×W in [-1, 1], resident
        n = len(images)
        t_start = time.perf_counter()

        # stage 1: the autoencoder
        cfg.autoencoder.image_channels = self.data.channels
        ae = Autoencoder(cfg.autoencoder, self.data.image_size).to(dev).train()
        ae_cfg = cfg.autoencoder_training
        ae_opt = self._opt(ae.parameters(), ae_cfg.lr)

        def ae_loss():
            idx = torch.randint(n, (ae_cfg.batch_size,), generator=gen, device=dev)
            return ae.loss(images[idx], generator=gen)[0]

        ae_stats = train_for(lambda s, p: self._step(ae, ae_opt, ae_loss, ae_cfg, s, p), budget * self.ae_fraction,
                             ae_cfg.batch_size, dev)
        self.flops["autoencoder_per_step"] = count_flops(lambda: ae_loss().float().mean().backward())
        ae_opt.zero_grad(set_to_none=True)

        # between the stages (counted in the budget): scale factor, cached posteriors
        ae.eval().requires_grad_(False)
        ae.estimate_scale_factor(images[:5000])
        mean, logvar = encode_dataset(ae, self.data.images, dev)
        std = (0.5 * logvar).exp()
        scale = ae.scale_factor.to(dev)
        sync(dev)
        prep_end = time.perf_counter() - t_start

        # stage 2: the latent denoiser
        cfg.unet.num_classes = self.data.num_classes if self.conditional else 0
        cfg.unet.in_channels = cfg.autoencoder.latent_channels
        cfg.validate()
        pipe = LatentDiffusion.build(cfg, self.data.image_size, self.data.class_names if self.conditional else ())
        pipe.autoencoder = ae
        den = pipe.denoiser.to(dev)
        den.net.train()
        tcfg = cfg.training
        opt = self._opt(den.net.parameters(), tcfg.lr)
        ema = EMA(den.net, tcfg.ema_decay)
        labels = torch.as_tensor(self.data.labels, device=dev) if self.conditional else None
        null, drop = cfg.unet.num_classes, cfg.diffusion.cond_drop_prob

        def den_loss():
            idx = torch.randint(n, (tcfg.batch_size,), generator=gen, device=dev)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen, device=dev)) * scale
            y = None
            if labels is not None:
                keep = torch.rand(idx.shape, generator=gen, device=dev) >= drop
                y = torch.where(keep, labels[idx], torch.full_like(idx, null))
            return diffusion_loss(den, z0, y, gen, cfg.diffusion.min_snr_gamma)

        def den_step(step, progress):
            self._step(den.net, opt, den_loss, tcfg, step, progress)
            ema.update(den.net, step)

        self.log(f"{self.name}: autoencoder {ae_stats.steps} steps in {ae_stats.seconds:.1f} s, scale factor and "
                 f"encoding of {n} images {prep_end - ae_stats.seconds:.1f} s")
        if prep_end >= budget:
            self.log(f"{self.name}: the autoencoder and the encoding used the whole budget; the denoiser gets one step "
                     "(use fewer images, --limit, or a larger budget)")
        remaining = max(budget - prep_end, 1e-3)
        den_stats = train_for(den_step, remaining, tcfg.batch_size, dev,
                              snapshot_at=[t - prep_end for t in snapshot_at if t > prep_end],
                              snapshot=lambda: {k: v.detach().clone() for k, v in ema.state_dict().items()},
                              t_offset=prep_end)
        total = time.perf_counter() - t_start
        self.flops["denoiser_per_step"] = count_flops(lambda: den_loss().float().mean().backward())
        opt.zero_grad(set_to_none=True)
        self.snapshots = den_stats.snapshots
        self.pipe = LatentDiffusion(cfg, ae, den.with_net(ema.model),
                                    pipe.class_names).eval()
        self._net_copy = copy.deepcopy(ema.model)
        return {"seconds": total, "autoencoder": ae_stats.to_dict(), "encode_seconds": prep_end - ae_stats.seconds,
                "denoiser": den_stats.to_dict(),
                # the number compared with the peers: images/s through the diffusion model, steady state
                "train_images_per_s": den_stats.images_per_s,
                "effective_images_per_s": den_stats.images / total,  # denoiser images over the whole budget
                "flops_per_step": self.flops["denoiser_per_step"], "steps": den_stats.steps,
                "params": {"autoencoder": sum(p.numel() for p in ae.parameters()),
                           "denoiser": sum(p.numel() for p in den.net.parameters())}}

    def sample(self, n: int, seed: int = 0, state=None) -> tuple[np.ndarray, np.ndarray | None]:
        pipe = self.pipe
        if state is not None:
            self._net_copy.load_state_dict(state)
            pipe = LatentDiffusion(self.cfg, pipe.autoencoder, pipe.denoiser.with_net(self._net_copy),
                                   pipe.class_names)
        labels = np.arange(n) % pipe.num_classes if pipe.num_classes else None
        return pipe.generate(n, sampler=self.sampler, steps=self.sample_steps, seed=seed, labels=labels)
