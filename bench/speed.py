"""Training and sampling speed of a model, through latentdiff's own code paths.

Training runs ``latentdiff.training.diffusion.train_diffusion``, the loop ``latentdiff train`` runs (data set encoded
once into cached posteriors resident on the device, a fresh posterior sample per step, fused AdamW and
bf16 autocast on CUDA, no host-device sync between log lines), for ``steps`` steps in a scratch run
directory holding the model's autoencoder; variants: float32 or bf16 autocast, ``training.channels_last``,
``training.compile``. Images/s is the median of the logged intervals after the
first one (which holds the warm-up and, for ``training.compile``, the compilation). MFU is achieved
FLOP/s (``FlopCounterMode`` on one forward + backward at the training batch size) over the measured
matmul peak: bf16 on CUDA, float32 on a CPU (where training runs in float32).

Sampling runs ``LatentDiffusion.generate`` end to end (guidance, sampler, decoding, uint8 images) at each
NFE, for each variant: eager or ``torch.compile`` (mode ``default``; on CUDA also ``reduce-overhead``,
which adds CUDA graphs), float32 or bf16 network arithmetic, NCHW or channels_last (NHWC) weights, at
each batch size. Every variant is warmed
up on one batch first (kernels, compilation), so the numbers are steady-state throughput.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import count_flops, sync

from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.loss import diffusion_loss
from latentdiff.pipeline import LatentDiffusion, model_dir
from latentdiff.pipeline.config import config_from_dict
from latentdiff.sampling import samplers
from latentdiff.training.diffusion import train_diffusion
from latentdiff.training.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class Variant:
    compile: str | bool         # False, or a torch.compile mode
    precision: str              # fp32 or bf16
    channels_last: bool = False

    @property
    def name(self) -> str:
        return (("eager" if not self.compile else f"compile:{self.compile}") + f", {self.precision}"
                + ", channels_last" * self.channels_last)


def train_variants(device: torch.device, compile_too: bool) -> list[Variant]:
    """Eager float32 first (the reference of the speed-ups); then what the device can use."""
    if device.type != "cuda":  # no bf16 units on most CPUs
        return [Variant(False, "fp32"), Variant(False, "fp32", True)] + [Variant("default", "fp32")] * compile_too
    out = [Variant(False, "fp32"), Variant(False, "bf16"), Variant(False, "bf16", True)]
    return out + [Variant("default", "bf16"), Variant("default", "bf16", True)] * compile_too


def sample_variants(device: torch.device, compile_too: bool) -> list[Variant]:
    if device.type != "cuda":
        return [Variant(False, "fp32")] + [Variant("default", "fp32")] * compile_too
    out = [Variant(False, "fp32"), Variant(False, "bf16"), Variant(False, "bf16", True)]
    if compile_too:
        out += [Variant("default", "bf16"), Variant("reduce-overhead", "bf16"),
                Variant("reduce-overhead", "bf16", True)]
    return out


def train_speed(model: str, device: torch.device, data_source: str, *, steps: int, log_every: int,
                limit: int | None, variants: list[Variant], peak_flops: float | None, log=print) -> dict:
    """Denoiser training images/s of `model`'s preset for each variant, FLOPs per step and MFU."""
    pipe = LatentDiffusion.load(model, device)
    cfg = config_from_dict(pipe.cfg.to_dict())
    cfg.device = str(device)
    cfg.data = dataclasses.replace(cfg.data, source=data_source, limit=limit)
    cfg.training = dataclasses.replace(cfg.training, steps=steps, log_every=log_every, checkpoint_every=steps,
                                       sample_every=0, keep_checkpoints=1)
    batch = cfg.training.batch_size
    flops = _train_flops(pipe, batch, device)
    rows = []
    for v in variants:
        run_cfg = dataclasses.replace(cfg, precision=v.precision, training=dataclasses.replace(
            cfg.training, compile=bool(v.compile), channels_last=v.channels_last))
        with tempfile.TemporaryDirectory(prefix="ld-speed-") as tmp:
            run = Path(tmp)
            shutil.copyfile(model_dir(model) / "autoencoder.safetensors", run / "autoencoder.safetensors")
            t0 = time.perf_counter()
            train_diffusion(run_cfg, run, progress=False, grid_path=run / "grid.png")
            wall = time.perf_counter() - t0
            records = read_metrics(run / "denoiser_metrics.jsonl")
        steady = [r["img_s"] for r in records[1:]] or [records[0]["img_s"]]
        ips = statistics.median(steady)
        achieved = flops * ips / batch
        rows.append({"variant": v.name, "compile": v.compile, "precision": v.precision,
                     "channels_last": v.channels_last, "images_per_s": ips,
                     "first_interval_images_per_s": records[0]["img_s"], "wall_seconds": wall,
                     "achieved_flops": achieved, "mfu": achieved / peak_flops if peak_flops else None})
        log(f"  train {v.name:>24}: {ips:,.0f} img/s (first interval {records[0]['img_s']:,.0f}), "
            f"{achieved / 1e12:.3g} TFLOP/s")
    for r in rows:
        r["speedup_vs_eager"] = r["images_per_s"] / rows[0]["images_per_s"]
    return {"model": model, "batch_size": batch, "steps": steps, "log_every": log_every, "data": data_source,
            "limit": limit, "flops_per_step": flops, "params": sum(p.numel() for p in pipe.denoiser.parameters()),
            "rows": rows}


def _train_flops(pipe: LatentDiffusion, batch: int, device: torch.device) -> int:
    den = pipe.denoiser.train()
    cfg = pipe.cfg
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(batch, *pipe.autoencoder.latent_shape, device=device)
    y = Cond(labels=torch.randint(pipe.num_classes, (batch,), device=device)) if pipe.num_classes else None
    flops = count_flops(lambda: diffusion_loss(den, z0, y, gen, cfg.diffusion.min_snr_gamma).mean().backward())
    den.zero_grad(set_to_none=True)
    den.eval()
    return flops


def sample_speed(model: str, device: torch.device, *, nfes, n: int, batch_sizes, sampler: str,
                 variants: list[Variant], log=print) -> dict:
    """Sampled images/s (decoding included) of `model` at each NFE for each variant and batch size."""
    pipe = LatentDiffusion.load(model, device)
    guidance = pipe.cfg.sample.guidance
    rows = []
    for v in variants:
        pipe.denoiser.net.to(memory_format=torch.channels_last if v.channels_last else torch.contiguous_format)
        for batch in batch_sizes:
            count = max(n // batch, 1) * batch  # whole batches: no second shape to compile or graph-capture
            labels = np.arange(count) % pipe.num_classes if pipe.num_classes else None
            options = {"sampler": sampler, "compile": v.compile, "precision": v.precision, "batch_size": batch}
            t0 = time.perf_counter()
            pipe.generate(batch, steps=2, labels=None if labels is None else labels[:batch], **options)  # warm-up
            warmup = time.perf_counter() - t0
            for nfe in nfes:
                steps = samplers.steps_for_nfe(sampler, nfe)
                sync(device)
                t0 = time.perf_counter()
                pipe.generate(count, steps=steps, labels=labels, guidance=guidance, **options)
                sync(device)
                seconds = time.perf_counter() - t0
                rows.append({"variant": v.name, "compile": v.compile, "precision": v.precision,
                             "channels_last": v.channels_last, "batch_size": batch,
                             "nfe": nfe, "steps": steps, "n": count, "seconds": seconds,
                             "images_per_s": count / seconds, "warmup_seconds": warmup})
                log(f"  sample {v.name:>24}, batch {batch:>5}, NFE {nfe:>3}: {count / seconds:,.1f} img/s")
    best = {}
    for r in rows:
        if r["nfe"] not in best or r["images_per_s"] > best[r["nfe"]]["images_per_s"]:
            best[r["nfe"]] = r
    eager = {r["nfe"]: r for r in rows if r["variant"] == variants[0].name and r["batch_size"] == batch_sizes[0]}
    for r in rows:
        r["speedup_vs_eager_fp32"] = r["images_per_s"] / eager[r["nfe"]]["images_per_s"]
    return {"model": model, "sampler": sampler, "guidance": guidance, "conditional": bool(pipe.num_classes),
            "rows": rows, "best": [best[k] for k in sorted(best)]}
