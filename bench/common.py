"""Shared pieces of the benchmark harness: clocks, peak memory, FLOP counting, the budgeted training loop.

Every system in the side-by-side run (latentdiff and its peers) is trained by :func:`train_for`, so
"the same wall-clock budget" means the same loop, the same clock and the same stopping rule.
"""

from __future__ import annotations

import math
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def autocast(device: torch.device):
    """bf16 autocast on CUDA for every system alike (latentdiff's own default); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class PeakMemory:
    """Peak memory of a phase.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (bytes held by tensors, exact).
    CPU: growth of the process's resident-set high-water mark (``ru_maxrss``) during the phase: an
    upper bound on what the phase added, and 0 when it stayed below an earlier phase's peak, so CPU
    numbers are only comparable between phases that ran first or grew the process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_ru_maxrss_growth"

    @staticmethod
    def _rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = self._rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = max(0, self._rss() - self._start)
        return False


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and convolutions, forward and backward),
    as counted by ``torch.utils.flop_counter.FlopCounterMode``; 1 multiply-add = 2 FLOPs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured dense matmul FLOP/s of this device, the MFU denominator, and its dtype: bf16 on CUDA
    (8192² operands), float32 on a CPU (2048² operands; CPU training runs in float32)."""
    dtype, n, iters = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 2048, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0), str(dtype).removeprefix("torch.")


def lr_budget(step: int, progress: float, peak: float, warmup_steps: int, floor: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``peak`` to ``floor``·peak, where the
    cosine runs over the *wall-clock* budget (``progress`` = elapsed / budget) instead of a step count."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class TrainStats:
    steps: int
    images: int
    seconds: float
    images_per_s: float        # steady state: the last 80% of the run (the first 20% holds warm-up/autotuning)
    snapshots: list = field(default_factory=list)  # [(seconds since the system's start, state)]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds,
                "images_per_s": self.images_per_s}


class Budget:
    """A wall-clock budget as a stopping rule: ``should_stop(step, elapsed)`` after every step, the hook
    of latentdiff's ``TrainLoop`` (the first call, with step 0, starts the clock).

    On CUDA the clock is read after a device sync every ``sync_every`` steps (a sync per step would
    slow the small models down), so a run may overshoot by up to that many steps; the reported
    seconds are the measured ones (the loop's own `elapsed` is host time and is not used). ``snapshot()``
    is called the first time the clock passes each time in ``snapshot_at`` (seconds since the start;
    at most once per step, never at the step that ends the budget) and by :meth:`stats` after the
    last step, so the last snapshot is always the final model.
    """

    def __init__(self, seconds: float, batch: int, device: torch.device, *, snapshot_at=(),
                 snapshot: Callable[[], object] | None = None, t_offset: float = 0.0, sync_every: int = 10):
        self.seconds, self.batch, self.device = seconds, batch, device
        self.every = sync_every if device.type == "cuda" else 1
        self.pending = sorted(float(s) for s in snapshot_at if s < seconds)
        self.snapshot, self.t_offset = snapshot, t_offset
        self.snaps, self.marks = [], [(0.0, 0)]
        self.elapsed = 0.0

    @property
    def progress(self) -> float:
        """Elapsed / budget at the last clock reading (the cosine learning-rate schedule runs over it)."""
        return self.elapsed / self.seconds

    def should_stop(self, step: int, _elapsed: float = 0.0) -> bool:
        if step == 0:
            sync(self.device)
            self.t0 = time.perf_counter()
            return False
        if step % self.every == 0:
            sync(self.device)
            self.elapsed = time.perf_counter() - self.t0
            self.marks.append((self.elapsed, step))
            if self.pending and self.elapsed >= self.pending[0] and self.snapshot is not None \
                    and self.elapsed < self.seconds:
                while self.pending and self.elapsed >= self.pending[0]:  # one snapshot per step, however many passed
                    self.pending.pop(0)
                self.snaps.append((self.t_offset + self.elapsed, self.snapshot()))
        return self.elapsed >= self.seconds

    def stats(self, step: int) -> TrainStats:
        """The run's numbers after its last step (and the final snapshot)."""
        sync(self.device)
        elapsed = time.perf_counter() - self.t0
        marks = self.marks + ([(elapsed, step)] if self.marks[-1][1] != step else [])
        if self.snapshot is not None:  # the final model; a snapshot taken after the last step would be the same one
            self.snaps.append((self.t_offset + elapsed, self.snapshot()))
        start = next((m for m in marks if m[0] >= 0.2 * elapsed and m[1] < step), marks[0])
        rate = (step - start[1]) * self.batch / max(elapsed - start[0], 1e-9)
        return TrainStats(step, step * self.batch, elapsed, rate, self.snaps)


def train_for(step_fn: Callable[[int, float], None], seconds: float, batch: int, device: torch.device, *,
              snapshot_at=(), snapshot: Callable[[], object] | None = None, t_offset: float = 0.0,
              sync_every: int = 10) -> TrainStats:
    """Call ``step_fn(step, progress)`` until ``seconds`` of wall clock have passed (at least one step);
    the clock, snapshots and statistics are those of :class:`Budget`."""
    budget = Budget(seconds, batch, device, snapshot_at=snapshot_at, snapshot=snapshot, t_offset=t_offset,
                    sync_every=sync_every)
    step = 0
    while not budget.should_stop(step):
        step_fn(step, budget.progress)
        step += 1
    return budget.stats(step)


def to_uint8_01(x: torch.Tensor):
    """Images in [0, 1], N×C×H×W -> uint8 N×H×W×C (the layout latentdiff's evaluation takes)."""
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
