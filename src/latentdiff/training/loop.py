"""The one training loop of every stage (autoencoder, denoiser, classifier), with seams.

:class:`TrainLoop` restores, steps, agrees across processes, logs, checkpoints and stops. What it
trains is a :class:`Stage` (a model and a per-sample loss); when it stops is a hook
``should_stop(step, elapsed_seconds)`` (by default: after ``cfg.steps`` steps), and the learning
rate another, ``lr(step)``, so a benchmark can drive the same loop by the clock.

Kept from one process to many (torchrun): identical seeds everywhere, so every process draws the
same global batch and noise and computes its rows (see ``distributed.py``); EMA, bf16 autocast,
grad clipping, atomic checkpoints with exact resume (weights, optimizer, RNG, running log sums),
SIGINT/SIGTERM save a checkpoint and stop, and a stop-or-skip policy for non-finite losses and
gradients. In the default path there is no host-device sync between log lines.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentdiff.errors import TrainingError
from latentdiff.pipeline.config import TrainConfig, uses_bf16
from latentdiff.training import distributed, rundir
from latentdiff.training.checkpoints import CheckpointStore, TrainState
from latentdiff.training.ema import EMA
from latentdiff.training.metrics import MetricsLog
from latentdiff.training.signals import stop_requests
from latentdiff.utils.progress import StepProgress

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """What differs between the training stages."""

    name: str                                    # "autoencoder", "denoiser" or "classifier"
    model: nn.Module                             # the module being trained
    # (global batch indices, generator, this process's rows of the batch) -> (per-sample loss of those rows, logs).
    # Random draws are made for the whole global batch, so N processes see exactly the numbers of one.
    loss: Callable[[torch.Tensor, torch.Generator, slice], tuple[torch.Tensor, dict]]
    num_items: int                               # size of the data set indices are drawn from
    cfg: TrainConfig
    on_sample: Callable[[int, nn.Module], None] | None = None  # (step, inference model) -> writes a grid
    section: str = "training"                    # the config section of `cfg`, for messages


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak over cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class _LossModule(nn.Module):
    """The stage's loss as the forward of one module holding the model, so that DDP (which syncs
    gradients only for computations that go through its own forward) can wrap it."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, idx, gen, rows):
        return self.loss(idx, gen, rows)


NEVER = torch.iinfo(torch.int64).max  # "no non-finite step yet"


class Health:
    """The first step whose loss or gradient was not finite, kept on the device.

    "stop" mode records it with tensor ops only (no host-device sync per step) and reads it at the
    next log line or checkpoint; by then later steps may have made the weights non-finite too, which
    is why a fault stops the run before any further checkpoint is written.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)  # at first_bad: the loss itself

    def record(self, step: int, loss_ok: torch.Tensor, grad_ok: torch.Tensor):
        first = ~(loss_ok & grad_ok) & (self.first_bad == NEVER)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.loss_bad = torch.where(first, ~loss_ok, self.loss_bad)


@dataclass
class Agreement:
    """What the processes agreed on at a sync point."""

    fault_step: int | None   # the first non-finite step, if any
    fault_in_loss: bool      # ... and whether the loss (not just the gradient) was non-finite there
    stop: bool               # some process was asked to stop (SIGINT/SIGTERM)


def agree(health: Health, stop: bool) -> Agreement:
    """One small MIN all-reduce of (first bad step, -loss flag, -stop flag) under DDP.

    DDP averages gradients, so a fault on one process makes the gradient non-finite on all of them
    at the same step: the minimum is that step, and the negated flags say whether any process saw it.
    """
    row = torch.stack([health.first_bad, -health.loss_bad.long(),
                       torch.tensor(-int(stop), dtype=torch.int64, device=health.first_bad.device)])
    first, neg_loss, neg_stop = distributed.all_reduce(row, "min").tolist()
    return Agreement(None if first == NEVER else int(first), neg_loss < 0, neg_stop < 0)


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Global gradient norm (a device tensor, no sync); clips to `clip` when > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class TrainLoop:
    """Train `stage.model` in RUN_DIR (checkpoints, metrics) or, with `run_dir=None`, without any file.

    `should_stop(step, elapsed)` is asked after every step (elapsed: host seconds since :meth:`run`
    began; on CUDA the host runs ahead of the device, so a hook that needs device time synchronises
    itself); `lr(step)` gives each step's learning rate. Only rank 0 logs and writes files.
    """

    def __init__(self, stage: Stage, run_dir: Path | None, device: torch.device, *, precision: str = "auto",
                 config: dict | None = None, progress: bool = True,
                 should_stop: Callable[[int, float], bool] | None = None, lr: Callable[[int], float] | None = None,
                 sections: tuple[str, ...] | None = None, overwrite: bool = False):
        cfg = self.cfg = stage.cfg
        self.stage, self.device, self.progress = stage, device, progress
        self.main = distributed.is_main()
        self.rows = distributed.shard(cfg.batch_size, f"{stage.section}.batch_size")
        self.should_stop = should_stop or (lambda step, elapsed: step >= cfg.steps)
        self.lr = lr or (lambda step: lr_at(step, cfg))
        self.model = stage.model.to(device).train()
        if cfg.channels_last:  # before the optimizer and the EMA copy, which then share the layout
            self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                     fused=device.type == "cuda")
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if cfg.compile:  # in place: parameter names, checkpoints and the EMA copy (made above) stay as they are
            for module in getattr(self.model, "compile_targets", lambda: (self.model,))():
                module.compile()
        # Identical seeds on every process: all draw the same global batch and noise (see distributed.py).
        self.data_gen = torch.Generator().manual_seed(cfg.seed)                     # batch indices (CPU)
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)   # noise, timesteps (device)
        self.step, self.skipped = 0, 0
        # Loss sums since the last log line; part of the checkpoint, so a resumed run logs the same numbers.
        self.loss_sum = torch.zeros((), device=device)
        self.logs_sum: dict[str, torch.Tensor] = {}
        self.n_logged = 0
        self.health = Health(device)
        self.store = CheckpointStore(run_dir / "checkpoints", stage.name, config or {}) if run_dir else None
        self.run_dir, self.overwrite, self.run_id = run_dir, overwrite, rundir.new_run_id()
        # resume: skip files that are not this stage's checkpoints, refuse a changed config (`sections` of it)
        self.resume_check = rundir.resume_check(stage.name, config or {}, sections)
        self.step_loss = distributed.wrap(_LossModule(self.model, stage.loss), device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))

    # --- the state a checkpoint holds ------------------------------------------------------------

    def state(self) -> TrainState:
        return TrainState(self.step, self.skipped, self.n_logged, self.model, self.ema, self.opt, self.data_gen,
                          self.noise_gen, self.loss_sum, self.logs_sum, self.run_id)

    def restore(self):
        """Continue from the newest intact checkpoint of this stage in RUN_DIR, if there is one."""
        found = self.store.restore(self.state(), self.device, self.resume_check) if self.store else None
        if found is None:
            log.info(f"no {self.stage.name} checkpoint in {self.store.directory if self.store else 'memory'}: "
                     "starting from step 0")
        else:
            self.step, self.skipped, self.n_logged = found.step, found.skipped, found.n_logged
            self.loss_sum, self.logs_sum = found.loss_sum, found.logs_sum
            self.run_id = found.meta.get("run_id") or self.run_id  # the run continues under its own id
            log.info(f"resumed {self.stage.name} from {found.path.name} at step {self.step}")
        distributed.same_on_all(self.step, f"the {self.stage.name} step to resume from")

    def save_checkpoint(self):
        if self.main and self.store is not None:
            self.store.save(self.state(), self.cfg.keep_checkpoints)

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, lr: float):
        """One optimizer step on a fresh global batch (or, in skip mode, a skipped batch)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(self.stage.num_items, (self.cfg.batch_size,), generator=self.data_gen)  # global batch
        with self.autocast:
            per_sample, logs = self.step_loss(idx, self.noise_gen, self.rows)
            loss = per_sample.float().mean()  # the loop owns the reduction
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP this also averages the gradients over the processes
        loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(_grad_norm(self.params, self.cfg.grad_clip))
        self.step += 1
        if self.cfg.nonfinite == "skip" and self._skip(loss_ok & grad_ok):
            return
        if self.cfg.nonfinite != "skip":
            self.health.record(self.step, loss_ok, grad_ok)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step - 1)
        self.loss_sum += loss.detach()
        for k, v in logs.items():
            self.logs_sum[k] = self.logs_sum.get(k, 0) + v.detach().float()
        self.n_logged += 1

    def _skip(self, ok: torch.Tensor) -> bool:
        """Skipping must be decided before the update: one host-device sync per step in this mode, and
        one tiny all-reduce, so that every process skips the same batches."""
        if not distributed.all_reduce((~ok).int(), "max").item():
            return False
        self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        log.warning(f"{self.stage.name} step {self.step}: non-finite loss or gradient, batch skipped "
                    f"({self.skipped} so far)")
        return True

    # --- sync points: log lines and checkpoints --------------------------------------------------

    def sync_point(self, lr: float, finished: bool, stop: bool, bar: StepProgress, metrics: MetricsLog) -> bool:
        """At a log line, a checkpoint, the end or a stop request: agree, log, checkpoint. True: stop now."""
        cfg = self.cfg
        at_log = self.step % cfg.log_every == 0 or finished
        at_ckpt = self.step % cfg.checkpoint_every == 0 or finished
        if not (at_log or at_ckpt or (stop and distributed.world_size() == 1)):
            return False  # under torchrun a stop request waits for the next log line or checkpoint
        agreed = agree(self.health, stop)
        if agreed.fault_step is not None:
            raise TrainingError(self._fault_message(agreed))
        if at_log:
            self._log_line(lr, bar, metrics)
        elif distributed.world_size() > 1:  # one copy of the running sums in the checkpoint: their mean
            self.loss_sum = distributed.all_reduce(self.loss_sum.clone(), "mean")
            self.logs_sum = {k: distributed.all_reduce(v.clone(), "mean") for k, v in self.logs_sum.items()}
        if at_ckpt or agreed.stop:
            self.save_checkpoint()
        if agreed.stop:
            distributed.barrier()  # no process exits while rank 0 still writes
        return agreed.stop

    def _log_line(self, lr: float, bar: StepProgress, metrics: MetricsLog):
        keys = sorted(self.logs_sum)
        sums = torch.stack([self.loss_sum.float()] + [self.logs_sum[k].float() for k in keys])
        sums = distributed.all_reduce(sums, "mean").tolist()  # the one host-device sync per log interval
        n = self.n_logged
        values = {k: (v / n if n else None) for k, v in zip(["loss"] + keys, sums)}  # None: every batch skipped
        now = time.perf_counter()
        ips = (self.step - self._last[1]) * self.cfg.batch_size / max(now - self._last[0], 1e-9)
        if self.main:
            bar.update(self.step, **{k: f"{v:.4g}" for k, v in values.items() if v is not None}, img_s=f"{ips:.0f}",
                       **({"skipped": self.skipped} if self.skipped else {}))
            metrics.write({"step": self.step, **values, "lr": lr, "skipped": self.skipped, "img_s": round(ips, 1)})
        self.loss_sum = torch.zeros((), device=self.device)
        self.logs_sum, self.n_logged, self._last = {}, 0, (now, self.step)

    def _fault_message(self, agreed: Agreement) -> str:
        name, section = self.stage.name, self.stage.section
        what = "loss" if agreed.fault_in_loss else "gradient"  # a non-finite loss makes the gradient non-finite too
        last = self.store.newest() if self.store else None
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written yet"
        return (f"{name} training stopped: non-finite {what} at step {agreed.fault_step}; {kept} and no later one "
                f"was written. Lower {section}.lr or set {section}.grad_clip, then continue with --resume; or set "
                f"{section}.nonfinite=skip to skip such batches")

    # --- the whole run ---------------------------------------------------------------------------

    def run(self, resume: bool = False) -> nn.Module:
        """Train until `should_stop`; returns the inference module (EMA if enabled, else the model), in eval mode.

        SIGINT/SIGTERM: the current step finishes, a checkpoint is saved and KeyboardInterrupt is raised.
        """
        torch.manual_seed(self.cfg.seed)  # dropout & co. draw from the global generator (a resume restores it)
        if resume:
            self.restore()
        elif self.store is not None:
            rundir.prepare_fresh_start(self.store.directory, self.stage.name, self.overwrite)
        if self.main and self.store is not None:
            self.store.remove_temporaries()
        metrics = MetricsLog(self.run_dir / f"{self.stage.name}_metrics.jsonl" if self.run_dir else Path(),
                             self.step, enabled=self.main and self.run_dir is not None,
                             tensorboard=self.cfg.tensorboard)
        bar = StepProgress(self.cfg.steps, self.step, self.stage.name, enabled=self.progress and self.main)
        t0 = time.perf_counter()
        self._last = (t0, self.step)
        finished = self.should_stop(self.step, 0.0)
        try:
            with stop_requests() as stop:
                while not finished:
                    lr = self.lr(self.step)
                    self.train_step(lr)
                    finished = self.should_stop(self.step, time.perf_counter() - t0)
                    if self.sync_point(lr, finished, stop.requested, bar, metrics):
                        bar.close()
                        log.info(f"stopped by signal at step {self.step}; checkpoint saved, continue with --resume")
                        raise KeyboardInterrupt
                    self._maybe_sample(finished)
        finally:
            bar.close()
            metrics.close()
        if self.skipped:
            log.info(f"{self.stage.name}: {self.skipped} of {self.step} batches were skipped for a non-finite loss "
                     "or gradient")
        return self.inference_model().eval()

    def _maybe_sample(self, finished: bool):
        every = self.cfg.sample_every
        if self.stage.on_sample and self.main and every and self.step % every == 0 and not finished:
            # Sampling must not move the training's global RNG: a run with grids equals one without.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.stage.on_sample(self.step, self.inference_model())

    def inference_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model
