"""Training for both stages with one loop: EMA, bf16 autocast, grad clipping, atomic checkpoints,
exact resume, periodic sample grids, console progress.

Stage 1 (`train_autoencoder`) fits the KL autoencoder on images and estimates the latent scale
factor. Stage 2 (`train_diffusion`) encodes the data set once into cached posteriors (mean,
log-variance), then trains the U-Net on fresh latent samples from them each step.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .autoencoder import Autoencoder, AutoencoderConfig
from .config import Config, TrainConfig
from .data import ImageData, load_dataset, to_tensor
from .denoiser import Denoiser, training_target
from .errors import ConfigError, ModelError
from .io import make_grid, save_png, write_text_atomic
from .pipeline import LatentDiffusion, resolve_device


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget quickly
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


@dataclass
class Stage:
    """What differs between the two training stages."""

    name: str                                    # "autoencoder" or "denoiser"
    model: nn.Module                             # the module being trained
    loss: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]]  # indices -> (per-sample loss, logs)
    num_items: int                               # size of the data set indices are drawn from
    cfg: TrainConfig
    on_sample: Callable[[int, nn.Module], None] | None = None  # (step, inference model) -> writes a grid


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _StopRequested(Exception):
    pass


def run_stage(stage: Stage, run_dir: Path, device: torch.device, *, precision: str = "bf16", resume: bool = False,
              config: dict | None = None, log: Callable[[str], None] = print, progress: bool = True) -> nn.Module:
    """The training loop. Returns the inference module (EMA if enabled, else the trained model)."""
    cfg = stage.cfg
    model = stage.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    data_gen = torch.Generator().manual_seed(cfg.seed)                     # batch indices (CPU)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)   # noise, timesteps (device)
    ckpt_dir = run_dir / "checkpoints"
    step = 0

    if resume:
        found = ckpt.load_latest(ckpt_dir, stage.name, device="cpu", warn=log)
        if found is None:
            log(f"no {stage.name} checkpoint in {ckpt_dir}: starting from step 0")
        else:
            tensors, meta, path = found
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            if ema is not None:
                ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            opt.load_state_dict(ckpt.unflatten_optimizer(tensors, meta["optimizer"]))
            torch.set_rng_state(tensors["rng.cpu"])
            data_gen.set_state(tensors["rng.data"])
            noise_gen.set_state(tensors["rng.noise"].to(noise_gen.get_state().device))
            if device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"])
            step = int(meta["step"])
            log(f"resumed {stage.name} from {path.name} at step {step}")

    def save_checkpoint():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        opt_tensors, opt_meta = ckpt.flatten_optimizer(opt.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        tensors["rng.data"] = data_gen.get_state()
        tensors["rng.noise"] = noise_gen.get_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta = {"step": step, "stage": stage.name, "optimizer": opt_meta, "config": config or {}}
        ckpt.save_state(ckpt.checkpoint_path(ckpt_dir, stage.name, step), tensors, meta)
        ckpt.prune_checkpoints(ckpt_dir, stage.name, cfg.keep_checkpoints)

    # SIGINT/SIGTERM: finish the current step, save, and stop.
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not in the main thread
            pass

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")
    bar = _progress(cfg.steps, step, stage.name, enabled=progress)
    loss_sum = torch.zeros((), device=device)
    logs_sum: dict[str, torch.Tensor] = {}
    n_logged, t_last, step_last = 0, time.perf_counter(), step
    try:
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            idx = torch.randint(stage.num_items, (cfg.batch_size,), generator=data_gen)
            with autocast:
                per_sample, logs = stage.loss(idx, noise_gen)
                loss = per_sample.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            loss_sum += loss.detach()
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0) + v.detach().float()
            n_logged += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = (loss_sum / n_logged).item()  # the one host-device sync per log interval
                if not math.isfinite(mean_loss):
                    raise ConfigError(f"{stage.name} training diverged: loss is {mean_loss} at step {step}; "
                                      "lower the learning rate or resume from the last checkpoint")
                now = time.perf_counter()
                ips = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                extra = {k: f"{(v / n_logged).item():.4g}" for k, v in logs_sum.items()}
                bar.update(step, loss=f"{mean_loss:.4g}", img_s=f"{ips:.0f}", **extra)
                loss_sum.zero_()
                logs_sum, n_logged, t_last, step_last = {}, 0, now, step
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop["flag"]:
                save_checkpoint()
            if stage.on_sample and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                stage.on_sample(step, ema.model if ema else model)
            if stop["flag"]:
                raise _StopRequested
    except _StopRequested:
        bar.close()
        log(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
        raise KeyboardInterrupt from None
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    final = ema.model if ema is not None else model
    return final.eval()


class _progress:
    """A tqdm bar when available and wanted, else periodic plain lines."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
            except ImportError:
                pass
        self.desc, self.total, self.last = desc, total, initial

    def update(self, step: int, **fields):
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(fields, refresh=False)
        else:
            print(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
        self.last = step

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- stage 1: autoencoder -----------------------------------------------------------------------

def _load_train_data(cfg: Config, split: str = "train") -> ImageData:
    d = cfg.data
    return load_dataset(d.source, split, data_dir=d.data_dir, image_size=d.image_size, channels=d.channels,
                        limit=d.limit if split == "train" else None)


def evaluate_autoencoder(ae: Autoencoder, images: np.ndarray, device) -> dict:
    """PSNR and SSIM of reconstructions (posterior mean) on uint8 images."""
    from .evaluate import reconstruct
    from .metrics import psnr, ssim

    rec = reconstruct(ae, images, device)
    return {"psnr": float(np.mean(psnr(images, rec))), "ssim": float(np.mean(ssim(images, rec))),
            "n": int(len(images))}


def train_autoencoder(cfg: Config, run_dir: str | Path, *, resume: bool = False, log=print,
                      progress: bool = True) -> tuple[Autoencoder, dict]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    data = _load_train_data(cfg)
    cfg.autoencoder.image_channels = data.channels
    ae_cfg = cfg.autoencoder
    ae_cfg.validate()
    write_text_atomic(run_dir / "autoencoder_config.json", json.dumps(cfg.to_dict(), indent=2))
    log(f"autoencoder: {len(data)} images from {data.source}, {data.channels}×{data.image_size[0]}×"
        f"{data.image_size[1]} -> latent {ae_cfg.latent_shape(data.image_size)}")
    ae = Autoencoder(ae_cfg, data.image_size)
    images = to_tensor(data.images).to(device)  # small data sets stay resident on the device

    def loss(idx, gen):
        return ae.loss(images[idx.to(device)], generator=gen)

    stage = Stage("autoencoder", ae, loss, len(images), cfg.autoencoder_training)
    run_stage(stage, run_dir, device, precision=cfg.precision, resume=resume, config=cfg.to_dict(), log=log,
              progress=progress)
    ae.eval()
    scale = ae.estimate_scale_factor(images[:5000])
    try:
        test = _load_train_data(cfg, "test")
        held_out = "test split"
    except Exception:  # an image folder without a test/ subfolder: report on training images
        test, held_out = data, "training images (no held-out split)"
    metrics = evaluate_autoencoder(ae, test.images[:2000], device)
    metrics.update(evaluated_on=held_out, scale_factor=scale, steps=cfg.autoencoder_training.steps)
    ckpt.save_state(run_dir / "autoencoder.safetensors", ae.state_dict(),
                    {"autoencoder": vars(ae_cfg), "image_size": list(data.image_size), "metrics": metrics,
                     "class_names": list(data.class_names), "data_source": data.source})
    log(f"autoencoder on {held_out}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
        f"latent scale factor {scale:.4f}")
    return ae, metrics


def load_trained_autoencoder(run_dir: Path, device) -> tuple[Autoencoder, dict]:
    path = Path(run_dir) / "autoencoder.safetensors"
    if not path.is_file():
        raise ModelError(f"{path} not found: train the autoencoder first with "
                         f"`latentdiff train-autoencoder --run-dir {run_dir}`")
    tensors, meta = ckpt.load_state(path)
    ae_cfg = AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["autoencoder"].items()})
    ae = Autoencoder(ae_cfg, tuple(meta["image_size"]))
    ae.load_state_dict(tensors)
    return ae.to(device).eval(), meta


# --- stage 2: latent diffusion ------------------------------------------------------------------

def encode_dataset(ae: Autoencoder, images: np.ndarray, device, batch_size: int = 500):
    """Posterior (mean, logvar) of every image, computed once: (N, c, h, w) each, on `device`."""
    means, logvars = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            post = ae.encode(to_tensor(images[i:i + batch_size]).to(device))
            means.append(post.mean)
            logvars.append(post.logvar)
    return torch.cat(means), torch.cat(logvars)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
    """A fresh sample of the cached posteriors of items `idx`, normalised: z0 = (μ + σ ε) · scale_factor."""
    noise = torch.randn(mean[idx].shape, generator=gen, device=mean.device)
    return (mean[idx] + std[idx] * noise) * scale


def diffusion_loss(den: Denoiser, z0: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample 'simple' loss ||target - net(z_t, t)||² (Ho et al. 2020 eq. 14), optionally min-SNR weighted.

    Min-SNR-γ (Hang et al. 2023) weights the x0-space error by min(SNR, γ); expressed in the
    network's own target space that is min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    """
    sched = den.schedule
    t = torch.randint(sched.num_steps, (z0.shape[0],), generator=gen, device=z0.device)
    eps = torch.randn(z0.shape, generator=gen, device=z0.device)
    abar = sched.abar(t)
    zt = sched.add_noise(z0, eps, t)
    out = den.net(zt, t, labels).float()
    target = training_target(den.prediction, z0, eps, abar)
    per_sample = (out - target).square().flatten(1).mean(1)
    if min_snr_gamma > 0:
        snr = (abar / (1 - abar)).to(z0.device).float()
        clipped = snr.clamp(max=min_snr_gamma)
        weight = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[den.prediction]
        per_sample = per_sample * weight
    return per_sample


def train_diffusion(cfg: Config, run_dir: str | Path, *, resume: bool = False, log=print,
                    progress: bool = True, grid_path: str | Path | None = None) -> LatentDiffusion:
    """Stage 2; when done, RUN_DIR is a model directory and a sample grid is written to `grid_path`
    (default RUN_DIR/samples.png)."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    ae, ae_meta = load_trained_autoencoder(run_dir, device)
    cfg.autoencoder = ae.cfg  # the trained codec is authoritative
    data = _load_train_data(cfg)
    if data.image_size != ae.image_size or data.channels != ae.cfg.image_channels:
        raise ConfigError(f"the data ({data.channels}×{data.image_size}) does not match the trained autoencoder "
                          f"({ae.cfg.image_channels}×{ae.image_size})")
    conditional = cfg.conditional and data.labels is not None and data.num_classes > 1
    cfg.unet.num_classes = data.num_classes if conditional else 0
    cfg.unet.in_channels = ae.cfg.latent_channels
    cfg.validate()
    write_text_atomic(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    pipe = LatentDiffusion.build(cfg, ae.image_size, data.class_names if conditional else ())
    pipe.autoencoder = ae
    den = pipe.denoiser.to(device)
    n_params = sum(p.numel() for p in den.parameters())
    log(f"denoiser: {n_params / 1e6:.2f}M parameters, latent {ae.latent_shape}, "
        f"{'class-conditional (' + str(data.num_classes) + ' classes)' if conditional else 'unconditional'}")
    mean, logvar = encode_dataset(ae, data.images, device)
    std = (0.5 * logvar).exp()
    scale = ae.scale_factor.to(device)
    labels = torch.as_tensor(data.labels, device=device) if conditional else None
    null = cfg.unet.num_classes
    drop = cfg.diffusion.cond_drop_prob

    def loss(idx, gen):
        idx = idx.to(device)
        z0 = sample_posterior(mean, std, scale, idx, gen)
        y = None
        if labels is not None:
            y = labels[idx]
            keep = torch.rand(y.shape, generator=gen, device=device) >= drop
            y = torch.where(keep, y, torch.full_like(y, null))
        return diffusion_loss(den, z0, y, gen, cfg.diffusion.min_snr_gamma), {}

    def on_sample(step, net):
        snapshot = LatentDiffusion(cfg, ae, Denoiser(net, den.schedule, den.prediction), pipe.class_names)
        write_sample_grid(snapshot, run_dir / "samples" / f"step-{step:08d}.png")

    stage = Stage("denoiser", den.net, loss, len(mean), cfg.training, on_sample)
    t0 = time.perf_counter()
    net = run_stage(stage, run_dir, device, precision=cfg.precision, resume=resume, config=cfg.to_dict(), log=log,
                    progress=progress)
    train_seconds = time.perf_counter() - t0
    final = LatentDiffusion(cfg, ae, Denoiser(net, den.schedule, den.prediction), pipe.class_names).eval()
    extra = {"train_steps": cfg.training.steps, "autoencoder_steps": ae_meta["metrics"].get("steps"),
             "data_source": data.source,
             "metrics": {"autoencoder PSNR (dB)": round(ae_meta["metrics"]["psnr"], 2),
                         "autoencoder SSIM": round(ae_meta["metrics"]["ssim"], 4)}}
    final.save(run_dir, extra=extra, autoencoder_meta=ae_meta)
    grid_path = Path(grid_path) if grid_path else run_dir / "samples.png"
    write_sample_grid(final, grid_path)
    log(f"model written to {run_dir} ({train_seconds:.0f} s of denoiser training); samples in {grid_path}")
    return final


def write_sample_grid(pipe: LatentDiffusion, path: Path, per_class: int = 8, seed: int = 0):
    """A grid of samples: one row per class for conditional models, else an 8×8 grid."""
    if pipe.num_classes:
        labels = np.repeat(np.arange(pipe.num_classes), per_class)
        images, _ = pipe.generate(len(labels), labels=labels, seed=seed)
        nrow = per_class
    else:
        images, _ = pipe.generate(64, seed=seed)
        nrow = 8
    save_png(make_grid(images, nrow), path, {"Software": "latentdiff", "latentdiff": {"seed": seed}}, scale=2)
