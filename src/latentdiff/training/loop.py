"""Training for both stages with one loop: EMA, bf16 autocast, grad clipping, atomic checkpoints,
exact resume, periodic sample grids, console progress and a metrics file, DDP under torchrun,
and a stop-or-skip policy for non-finite losses and gradients.

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

from latentdiff.codecs.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from latentdiff.data import ImageData, load_dataset
from latentdiff.diffusion.denoiser import Denoiser, training_target
from latentdiff.errors import ConfigError, ModelError, TrainingError, WriteError
from latentdiff.pipeline import LatentDiffusion, resolve_device
from latentdiff.pipeline.config import Config, TrainConfig, apply_updates, uses_bf16
from latentdiff.training import checkpoints as ckpt
from latentdiff.training import distributed
from latentdiff.utils import state as ld_state
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.images import make_grid, save_png, to_tensor
from latentdiff.utils.progress import StepProgress


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
    # (global batch indices, generator, this process's rows of the batch) -> (per-sample loss of those rows, logs).
    # Random draws are made for the whole global batch, so N processes see exactly the numbers of one.
    loss: Callable[[torch.Tensor, torch.Generator, slice], tuple[torch.Tensor, dict]]
    num_items: int                               # size of the data set indices are drawn from
    cfg: TrainConfig
    on_sample: Callable[[int, nn.Module], None] | None = None  # (step, inference model) -> writes a grid
    section: str = "training"                    # the config section of `cfg`, for messages


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _StopRequested(Exception):
    pass


class _LossModule(nn.Module):
    """The stage's loss as the forward of one module holding the model, so that DDP (which syncs
    gradients only for computations that go through its own forward) can wrap it."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, idx, gen, rows):
        return self.loss(idx, gen, rows)


class MetricsLog:
    """RUN_DIR/<stage>_metrics.jsonl: one JSON line per log interval, written by rank 0 and flushed.

    On (re)start the file is cut back to the steps the run starts from, so lines logged after the
    last checkpoint by a killed run (and a half-written last line) never appear twice.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
                    kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file written by :class:`MetricsLog`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


_NO_FAULT = 2**62  # "no non-finite step yet" in the packed (step·4 + kind) fault code


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Global gradient norm (a device tensor, no sync); clips to `clip` when > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _restore(ckpt_dir: Path, stage: Stage, log) -> tuple[dict, dict, Path] | None:
    """The newest intact checkpoint, saying which newer ones were corrupt (rank 0 renames those to
    *.corrupt so they leave the rotation); an error if checkpoints exist but none is intact."""
    existing = ckpt.list_checkpoints(ckpt_dir, stage.name)
    found = ckpt.load_latest(ckpt_dir, stage.name, device="cpu", warn=log)
    if found is None:
        if existing:
            raise ModelError(f"none of the {len(existing)} {stage.name} checkpoints in {ckpt_dir} is intact; move them "
                             "away to start from step 0")
        return None
    newer = existing[:existing.index(found[2])] if found[2] in existing else []
    if newer:
        log(f"resuming from the newest intact checkpoint {found[2].name}, not from the corrupt "
            f"{', '.join(p.name for p in newer)} (renamed to *.corrupt)")
        if distributed.is_main():
            for bad in newer:
                bad.replace(bad.with_name(bad.name + ".corrupt"))
    return found


def run_stage(stage: Stage, run_dir: Path, device: torch.device, *, precision: str = "auto", resume: bool = False,
              config: dict | None = None, log: Callable[[str], None] = print, progress: bool = True) -> nn.Module:
    """The training loop, for one process or for every process under torchrun.

    Returns the inference module (EMA if enabled, else the trained model). Only rank 0 logs and
    writes files. Fault handling: SIGINT/SIGTERM save a checkpoint and stop; a non-finite loss or
    gradient stops the run (without writing a checkpoint of bad weights) or, with
    ``nonfinite: skip``, skips that batch.
    """
    cfg = stage.cfg
    main = distributed.is_main()
    log = log if main else _quiet
    rows = distributed.shard(cfg.batch_size, f"{stage.section}.batch_size")
    model = stage.model.to(device).train()
    if cfg.channels_last:  # before the optimizer and the EMA copy, which then share the layout
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.compile:  # in place: parameter names, checkpoints and the EMA copy (made above) stay as they are
        for module in getattr(model, "compile_targets", lambda: (model,))():
            module.compile()
    # Identical seeds on every process: all draw the same global batch and noise (see distributed.py).
    data_gen = torch.Generator().manual_seed(cfg.seed)                     # batch indices (CPU)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)   # noise, timesteps (device)
    ckpt_dir = run_dir / "checkpoints"
    step, skipped = 0, 0
    # Loss sums since the last log line; part of the checkpoint, so a resumed run logs the same numbers.
    loss_sum = torch.zeros((), device=device)
    logs_sum: dict[str, torch.Tensor] = {}
    n_logged = 0

    if resume:
        found = _restore(ckpt_dir, stage, log)
        if found is None:
            log(f"no {stage.name} checkpoint in {ckpt_dir}: starting from step 0")
        else:
            tensors, meta, path = found
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            if ema is not None:
                ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            opt.load_state_dict(ld_state.unflatten_optimizer(tensors, meta["optimizer"]))
            torch.set_rng_state(tensors["rng.cpu"])
            data_gen.set_state(tensors["rng.data"])
            noise_gen.set_state(tensors["rng.noise"].to(noise_gen.get_state().device))
            if device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
            step, skipped, n_logged = int(meta["step"]), int(meta.get("skipped", 0)), int(meta.get("log_count", 0))
            if "log.loss" in tensors:
                loss_sum = tensors["log.loss"].to(device)
                logs_sum = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("log.") and k != "log.loss"}
            log(f"resumed {stage.name} from {path.name} at step {step}")
        distributed.same_on_all(step, f"the {stage.name} step to resume from")
    if main:
        for tmp in ckpt.stale_temporaries(ckpt_dir, stage.name):  # left by a process killed mid-save
            tmp.unlink(missing_ok=True)
    metrics = MetricsLog(run_dir / f"{stage.name}_metrics.jsonl", step, enabled=main)
    step_loss = distributed.wrap(_LossModule(model, stage.loss), device)

    def save_checkpoint():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        if not _all_finite(tensors.values()):  # belt and braces: never store bad weights
            raise TrainingError(f"{stage.name} weights are not finite at step {step}; not writing a checkpoint "
                                f"(the last good one in {ckpt_dir} is kept)")
        opt_tensors, opt_meta = ld_state.flatten_optimizer(opt.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        tensors["rng.data"] = data_gen.get_state()
        tensors["rng.noise"] = noise_gen.get_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        tensors["log.loss"] = loss_sum
        tensors.update({f"log.{k}": v for k, v in logs_sum.items()})
        meta = {"step": step, "stage": stage.name, "optimizer": opt_meta, "config": config or {},
                "skipped": skipped, "log_count": n_logged}
        try:
            ld_state.save_state(ckpt.checkpoint_path(ckpt_dir, stage.name, step), tensors, meta)
        except WriteError as e:
            last = ckpt.list_checkpoints(ckpt_dir, stage.name)
            hint = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written yet"
            raise WriteError(f"{e}. Training stopped at step {step}; {hint}: free space, then continue with "
                             "--resume") from None
        ckpt.prune_checkpoints(ckpt_dir, stage.name, cfg.keep_checkpoints)

    # SIGINT/SIGTERM: finish the current step, save, and stop. Under torchrun the processes agree
    # on stopping at the next log interval or checkpoint (where they exchange flags anyway).
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not in the main thread
            pass

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))
    single = distributed.world_size() == 1
    # First non-finite step, packed as step·4 + kind (bit 0: loss, bit 1: gradient), kept on the
    # device so that "stop" mode needs no host-device sync per step; it is read at the sync points
    # below. By then later steps may have made the weights non-finite, which is why a fault stops
    # the run before any further checkpoint is written.
    fault = torch.full((), _NO_FAULT, dtype=torch.int64, device=device)
    bar = StepProgress(cfg.steps, step, stage.name, enabled=progress and main)
    t_last, step_last = time.perf_counter(), step
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(stage.num_items, (cfg.batch_size,), generator=data_gen)  # the global batch
            with autocast:
                per_sample, logs = step_loss(idx, noise_gen, rows)
                loss = per_sample.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients over the processes
            kind = (~torch.isfinite(loss)).long() + 2 * (~torch.isfinite(_grad_norm(params, cfg.grad_clip))).long()
            step += 1
            if cfg.nonfinite == "skip":
                # Skipping must be decided before the update: one host-device sync per step in this
                # mode (and one tiny all-reduce, so that every process skips the same batches).
                skip = bool(distributed.all_reduce(kind.clamp(max=1), "max").item())
            else:
                fault = torch.where((kind > 0) & (fault == _NO_FAULT), step * 4 + kind, fault)
                skip = False
            if skip:
                skipped += 1
                opt.zero_grad(set_to_none=True)
                log(f"warning: {stage.name} step {step}: non-finite loss or gradient, batch skipped "
                    f"({skipped} so far)")
            else:
                opt.step()
                if ema is not None:
                    ema.update(model, step - 1)
                loss_sum += loss.detach()
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0) + v.detach().float()
                n_logged += 1

            at_log = step % cfg.log_every == 0 or step == cfg.steps
            at_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if at_log or at_ckpt or (single and stop["flag"]):
                code, stopping = _agree(fault, stop["flag"])
                if code != _NO_FAULT:
                    raise TrainingError(_fault_message(stage, code // 4, code % 4, ckpt_dir))
                if at_log:
                    values = _mean_logs(loss_sum, logs_sum, n_logged)
                    now = time.perf_counter()
                    ips = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    if main:
                        bar.update(step, **{k: f"{v:.4g}" for k, v in values.items() if v is not None},
                                   img_s=f"{ips:.0f}", **({"skipped": skipped} if skipped else {}))
                        metrics.write({"step": step, **values, "lr": lr, "skipped": skipped, "img_s": round(ips, 1)})
                    loss_sum = torch.zeros((), device=device)
                    logs_sum, n_logged, t_last, step_last = {}, 0, now, step
                elif not single:  # keep one copy of the running sums in the checkpoint: their mean over processes
                    loss_sum = distributed.all_reduce(loss_sum.clone(), "mean")
                    logs_sum = {k: distributed.all_reduce(v.clone(), "mean") for k, v in logs_sum.items()}
                if at_ckpt or stopping:
                    if main:
                        save_checkpoint()
                    if stopping:
                        distributed.barrier()  # no process exits while rank 0 still writes
                        raise _StopRequested
            if stage.on_sample and main and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                stage.on_sample(step, ema.model if ema else model)
    except _StopRequested:
        bar.close()
        log(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
        raise KeyboardInterrupt from None
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if skipped:
        log(f"{stage.name}: {skipped} of {cfg.steps} batches were skipped for a non-finite loss or gradient")
    final = ema.model if ema is not None else model
    return final.eval()


def _quiet(*args, **kwargs):
    pass


def _agree(fault: torch.Tensor, stop: bool) -> tuple[int, bool]:
    """(earliest fault code, whether any process was asked to stop): one small all-reduce under DDP."""
    both = torch.stack([fault, torch.tensor(-int(stop), dtype=torch.int64, device=fault.device)])
    code, neg_stop = distributed.all_reduce(both, "min").tolist()
    return int(code), neg_stop < 0


def _mean_logs(loss_sum: torch.Tensor, logs_sum: dict, n: int) -> dict:
    """Mean loss (and extra logs) since the last log line, averaged over processes; None if every batch was skipped."""
    keys = sorted(logs_sum)
    sums = torch.stack([loss_sum.float()] + [logs_sum[k].float() for k in keys])
    sums = distributed.all_reduce(sums, "mean").tolist()  # the one host-device sync per log interval
    return {k: (v / n if n else None) for k, v in zip(["loss"] + keys, sums)}


def _fault_message(stage: Stage, step: int, kind: int, ckpt_dir: Path) -> str:
    what = "loss" if kind & 1 else "gradient"  # a non-finite loss makes the gradient non-finite too
    last = ckpt.list_checkpoints(ckpt_dir, stage.name)
    kept = f"the last good checkpoint {last[0]} is kept" if last else "no checkpoint had been written yet"
    return (f"{stage.name} training stopped: non-finite {what} at step {step}; {kept} and no later one was written. "
            f"Lower {stage.section}.lr or set {stage.section}.grad_clip, then continue with --resume; or set "
            f"{stage.section}.nonfinite=skip to skip such batches")


# --- stage 1: autoencoder -----------------------------------------------------------------------

def _load_train_data(cfg: Config, split: str = "train") -> ImageData:
    d = cfg.data
    return load_dataset(d.source, split, data_dir=d.data_dir, image_size=d.image_size, channels=d.channels,
                        limit=d.limit if split == "train" else None)


def evaluate_autoencoder(ae: Autoencoder, images: np.ndarray, device) -> dict:
    """PSNR and SSIM of reconstructions (posterior mean) on uint8 images."""
    from latentdiff.evaluation.evaluate import reconstruct
    from latentdiff.evaluation.metrics import psnr, ssim

    rec = reconstruct(ae, images, device)
    return {"psnr": float(np.mean(psnr(images, rec))), "ssim": float(np.mean(ssim(images, rec))),
            "n": int(len(images))}


def train_autoencoder(cfg: Config, run_dir: str | Path, *, resume: bool = False, log=print,
                      progress: bool = True) -> tuple[Autoencoder, dict]:
    """Stage 1 (also one process of several under torchrun; rank 0 evaluates and writes the model)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.setup(resolve_device(cfg.device))
    main = distributed.is_main()
    log = log if main else _quiet
    data = _load_train_data(cfg)
    cfg.autoencoder.image_channels = data.channels
    ae_cfg = cfg.autoencoder
    ae_cfg.validate()
    if main:
        write_text_atomic(run_dir / "autoencoder_config.json", json.dumps(cfg.to_dict(), indent=2))
    log(f"autoencoder: {len(data)} images from {data.source}, {data.channels}×{data.image_size[0]}×"
        f"{data.image_size[1]} -> latent {ae_cfg.latent_shape(data.image_size)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.autoencoder_training.seed)  # the same initial weights on every run
        ae = Autoencoder(ae_cfg, data.image_size)
    images = to_tensor(data.images).to(device)  # small data sets stay resident on the device

    def loss(idx, gen, rows):
        # ε of the posterior sample for the whole global batch, drawn on every process; each keeps its rows
        noise = torch.randn((len(idx), *ae.latent_shape), generator=gen, device=device)
        return ae.loss(images[idx[rows].to(device)], noise=noise[rows])

    stage = Stage("autoencoder", ae, loss, len(images), cfg.autoencoder_training, section="autoencoder_training")
    run_stage(stage, run_dir, device, precision=cfg.precision, resume=resume, config=cfg.to_dict(), log=log,
              progress=progress)
    ae.eval()
    stats = ae.fit_latent_stats(images[:5000])
    metrics: dict = {}
    if main:
        try:
            test = _load_train_data(cfg, "test")
            held_out = "test split"
        except Exception:  # an image folder without a test/ subfolder: report on training images
            test, held_out = data, "training images (no held-out split)"
        metrics = evaluate_autoencoder(ae, test.images[:2000], device)
        metrics.update(evaluated_on=held_out, latent_stats=stats, steps=cfg.autoencoder_training.steps)
        ld_state.save_state(run_dir / "autoencoder.safetensors", ae.state_dict(),
                        {"autoencoder": vars(ae_cfg), "image_size": list(data.image_size), "metrics": metrics,
                         "class_names": list(data.class_names), "data_source": data.source})
        log(f"autoencoder on {held_out}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
            f"latent scale per channel {', '.join(f'{v:.3f}' for v in stats['scale'])}")
    distributed.barrier()  # the other processes wait until rank 0 has written the model
    return ae, metrics


def load_trained_autoencoder(run_dir: Path, device) -> tuple[Autoencoder, dict]:
    path = Path(run_dir) / "autoencoder.safetensors"
    if not path.is_file():
        raise ModelError(f"{path} not found: train the autoencoder first with "
                         f"`latentdiff train-autoencoder --run-dir {run_dir}`")
    tensors, meta = ld_state.load_state(path)
    size = meta.get("image_size")
    try:  # the header is data from disk: check types and ranges before building anything
        ae_cfg = AutoencoderConfig()
        apply_updates(ae_cfg, meta.get("autoencoder"), "autoencoder.")
        ae_cfg.validate()
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
            raise ConfigError(f"image_size must be [height, width] with integers in 1…4096, got {size!r:.80}")
        ae = Autoencoder(ae_cfg, (size[0], size[1]))
        ae.load_state_dict(tensors)
    except (ConfigError, RuntimeError) as e:  # RuntimeError: load_state_dict's missing/unexpected/shape report
        raise ModelError(f"{path} is not a usable latentdiff autoencoder: {str(e).splitlines()[0]}") from None
    return ae.to(device).eval(), meta


# --- stage 2: latent diffusion ------------------------------------------------------------------

def encode_dataset(ae: Autoencoder, images: np.ndarray, device, batch_size: int = 500) -> DiagonalGaussian:
    """The posterior of every image, computed once (unnormalised; the codec normalises samples of it)."""
    return ae.encode_dataset(to_tensor(images).to(device), batch_size)


def sample_posterior(ae: Autoencoder, post: DiagonalGaussian, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A fresh normalised sample of the cached posteriors of items `idx` (the codec owns the normalisation)."""
    noise = torch.randn(post.mean[idx].shape, generator=gen, device=post.mean.device)
    return ae.sample_latent(DiagonalGaussian(post.mean[idx], post.logvar[idx]), noise=noise)


def diffusion_loss(den: Denoiser, z0: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator,
                   min_snr_gamma: float = 0.0, rows: slice = slice(None)) -> torch.Tensor:
    """Per-sample 'simple' loss ||target - net(z_t, t)||² (Ho et al. 2020 eq. 14), optionally min-SNR weighted.

    Min-SNR-γ (Hang et al. 2023) weights the x0-space error by min(SNR, γ); expressed in the
    network's own target space that is min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v.
    t and ε are drawn for the whole batch `z0`; the loss is computed for its `rows` only (one
    process's share of a global batch under DDP).
    """
    sched = den.schedule
    t = torch.randint(sched.num_steps, (z0.shape[0],), generator=gen, device=z0.device)
    eps = torch.randn(z0.shape, generator=gen, device=z0.device)
    z0, eps, t = z0[rows], eps[rows], t[rows]
    labels = labels[rows] if labels is not None else None
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
    (default RUN_DIR/samples.png). Under torchrun every process trains its share; rank 0 writes."""
    run_dir = Path(run_dir)
    device = distributed.setup(resolve_device(cfg.device))
    main = distributed.is_main()
    log = log if main else _quiet
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
    if main:
        write_text_atomic(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed)  # the same initial weights on every run
        pipe = LatentDiffusion.build(cfg, ae.image_size, data.class_names if conditional else ())
    pipe.autoencoder = ae
    den = pipe.denoiser.to(device)
    n_params = sum(p.numel() for p in den.parameters())
    log(f"denoiser: {n_params / 1e6:.2f}M parameters, latent {ae.latent_shape}, "
        f"{'class-conditional (' + str(data.num_classes) + ' classes)' if conditional else 'unconditional'}")
    post = encode_dataset(ae, data.images, device)
    labels = torch.as_tensor(data.labels, device=device) if conditional else None
    null = cfg.unet.num_classes
    drop = cfg.diffusion.cond_drop_prob

    def loss(idx, gen, rows):
        # Every random draw covers the whole global batch (cheap next to the network), so that each
        # process's rows get exactly the numbers a single process would; the U-Net sees only `rows`.
        idx = idx.to(device)
        z0 = sample_posterior(ae, post, idx, gen)
        y = None
        if labels is not None:
            y = labels[idx]
            keep = torch.rand(y.shape, generator=gen, device=device) >= drop
            y = torch.where(keep, y, torch.full_like(y, null))
        return diffusion_loss(den, z0, y, gen, cfg.diffusion.min_snr_gamma, rows), {}

    def on_sample(step, net):
        snapshot = LatentDiffusion(cfg, ae, den.with_net(net), pipe.class_names)
        write_sample_grid(snapshot, run_dir / "samples" / f"step-{step:08d}.png")

    stage = Stage("denoiser", den.net, loss, len(post.mean), cfg.training, on_sample)
    t0 = time.perf_counter()
    net = run_stage(stage, run_dir, device, precision=cfg.precision, resume=resume, config=cfg.to_dict(), log=log,
                    progress=progress)
    train_seconds = time.perf_counter() - t0
    final = LatentDiffusion(cfg, ae, den.with_net(net), pipe.class_names).eval()
    if main:
        ae_metrics = ae_meta.get("metrics") or {}  # absent when the autoencoder came from a saved model directory
        extra = {"train_steps": cfg.training.steps, "autoencoder_steps": ae_metrics.get("steps"),
                 "data_source": data.source,
                 "metrics": {label: round(ae_metrics[key], digits) for label, key, digits in
                             (("autoencoder PSNR (dB)", "psnr", 2), ("autoencoder SSIM", "ssim", 4))
                             if isinstance(ae_metrics.get(key), (int, float))}}
        final.save(run_dir, extra=extra, autoencoder_meta=ae_meta)
        grid_path = Path(grid_path) if grid_path else run_dir / "samples.png"
        write_sample_grid(final, grid_path)
        log(f"model written to {run_dir} ({train_seconds:.0f} s of denoiser training); samples in {grid_path}")
    distributed.barrier()  # the other processes wait until rank 0 has written the model
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
