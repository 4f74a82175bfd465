"""latentdiff trained within a wall-clock budget that *includes* the autoencoder.

The budget is spent in one timed line: autoencoder training (``ae_fraction`` of the budget), the
latent scale factor and the one-off encoding of the data set into cached posteriors, then the
latent denoiser for whatever time is left. Both stages run through latentdiff's own training loop
(``training.loop.TrainLoop``) with the stages ``latentdiff train-autoencoder`` and ``latentdiff train``
use (``autoencoder_stage``, ``denoiser_stage``: the library's loss, EMA, AdamW, clipping, bf16 on
CUDA). What differs is only the stopping rule, given to the loop as its ``should_stop`` hook (time
instead of steps, so the cosine learning-rate decay runs over the budget), and that no files are written.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
from common import Budget, count_flops, lr_budget, sync

from latentdiff.codecs.autoencoder import Autoencoder
from latentdiff.data import ImageData
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import Config
from latentdiff.pipeline.presets import PRESETS
from latentdiff.training.autoencoder import autoencoder_stage
from latentdiff.training.diffusion import denoiser_stage
from latentdiff.training.latents import encode_dataset
from latentdiff.training.loop import TrainLoop
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

    def _loop(self, stage, budget: Budget) -> TrainLoop:
        """latentdiff's own training loop, stopped by the clock, with the cosine decay over the budget and
        no files (no checkpoints, no metrics, no sync points before the end)."""
        tcfg = stage.cfg
        stage.cfg = dataclasses.replace(tcfg, seed=self.seed, log_every=2**62, checkpoint_every=2**62, sample_every=0)
        return TrainLoop(stage, None, self.device, precision=self.cfg.precision, progress=False,
                         should_stop=budget.should_stop,
                         lr=lambda step: lr_budget(step, budget.progress, tcfg.lr, tcfg.warmup_steps, 0.1))

    def _flops(self, stage) -> int:
        """FLOPs of one forward + backward of the stage's loss on one global batch."""
        idx = torch.randint(stage.num_items, (stage.cfg.batch_size,), generator=torch.Generator().manual_seed(0))
        gen = torch.Generator(device=self.device).manual_seed(0)
        flops = count_flops(lambda: stage.loss(idx, gen, slice(None))[0].float().mean().backward())
        stage.model.zero_grad(set_to_none=True)
        return flops

    def train(self, budget: float, snapshot_at=()) -> dict:
        cfg, dev = self.cfg, self.device
        torch.manual_seed(self.seed)
        images = to_tensor(self.data.images).to(dev)  # N×C×H×W in [-1, 1], resident
        n = len(images)
        t_start = time.perf_counter()

        # stage 1: the autoencoder
        cfg.autoencoder.image_channels = self.data.channels
        ae = Autoencoder(cfg.autoencoder, self.data.image_size)
        ae_stage = autoencoder_stage(cfg, ae, images, dev)
        ae_clock = Budget(budget * self.ae_fraction, cfg.autoencoder_training.batch_size, dev)
        ae_loop = self._loop(ae_stage, ae_clock)
        ae_loop.run()
        ae_stats = ae_clock.stats(ae_loop.step)
        self.flops["autoencoder_per_step"] = self._flops(ae_stage)

        # between the stages (counted in the budget): scale factor, cached posteriors
        ae.eval().requires_grad_(False)
        ae.fit_latent_stats(images[:5000])
        post = encode_dataset(ae, self.data.images, dev)
        sync(dev)
        prep_end = time.perf_counter() - t_start

        # stage 2: the latent denoiser
        cfg.unet.num_classes = self.data.num_classes if self.conditional else 0
        cfg.unet.in_channels = cfg.autoencoder.latent_channels
        cfg.validate()
        pipe = LatentDiffusion.build(cfg, self.data.image_size, self.data.class_names if self.conditional else ())
        pipe.autoencoder = ae
        den = pipe.denoiser.to(dev)
        labels = torch.as_tensor(self.data.labels, device=dev) if self.conditional else None
        den_stage = denoiser_stage(cfg, den, post, labels)

        self.log(f"{self.name}: autoencoder {ae_stats.steps} steps in {ae_stats.seconds:.1f} s, scale factor and "
                 f"encoding of {n} images {prep_end - ae_stats.seconds:.1f} s")
        if prep_end >= budget:
            self.log(f"{self.name}: the autoencoder and the encoding used the whole budget; the denoiser gets one step "
                     "(use fewer images, --limit, or a larger budget)")
        remaining = max(budget - prep_end, 1e-3)
        loop = None
        clock = Budget(remaining, cfg.training.batch_size, dev,
                       snapshot_at=[t - prep_end for t in snapshot_at if t > prep_end],
                       snapshot=lambda: {k: v.detach().clone() for k, v in loop.inference_model().state_dict().items()},
                       t_offset=prep_end)
        loop = self._loop(den_stage, clock)
        net = loop.run()
        den_stats = clock.stats(loop.step)
        total = time.perf_counter() - t_start
        self.flops["denoiser_per_step"] = self._flops(den_stage)
        self.snapshots = den_stats.snapshots
        self.pipe = LatentDiffusion(cfg, ae, den.with_net(net), pipe.class_names).eval()
        self._net_copy = copy.deepcopy(net)
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
