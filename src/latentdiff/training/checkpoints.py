"""Resumable training checkpoints: RUN_DIR/checkpoints/<stage>-<step>.safetensors.

A checkpoint holds the model, EMA, optimizer, the RNG states, the running log sums and the step,
written atomically with checksums by ``utils/state.py`` (nothing here unpickles). Resume takes the
newest intact checkpoint; newer corrupt ones are renamed *.corrupt so they leave the rotation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentdiff.errors import ModelError, TrainingError, WriteError
from latentdiff.training import distributed
from latentdiff.utils import state as ld_state
from latentdiff.utils.state import load_state

log = logging.getLogger(__name__)


def checkpoint_path(directory: Path, stage: str, step: int) -> Path:
    return Path(directory) / f"{stage}-{step:08d}.safetensors"


def list_checkpoints(directory: Path, stage: str) -> list[Path]:
    """Checkpoints of `stage`, newest first."""
    pattern = re.compile(rf"^{re.escape(stage)}-(\d{{8}})\.safetensors$")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{stage}-*.safetensors")
             if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(directory: Path, stage: str, device="cpu", warn=None,
                check: Callable[[dict, dict], None] | None = None):
    """The newest intact checkpoint (tensors, meta, path), skipping corrupt ones with a warning; None if none.

    `check(tensors, meta)` may raise ModelError to skip a file that is intact but not usable here.
    """
    warn = warn or log.warning
    for path in list_checkpoints(directory, stage):
        try:
            tensors, meta = load_state(path, device)
            if check is not None:
                check(tensors, meta)
            return tensors, meta, path
        except ModelError as e:
            warn(f"skipping checkpoint: {e}; falling back to the next older one")
    return None


def stale_temporaries(directory: Path, stage: str) -> list[Path]:
    """Temporary files of `stage` checkpoints left behind by a killed process (see utils.files.atomic_path)."""
    return sorted(Path(directory).glob(f".{stage}-*.safetensors.*.tmp"))


def prune_checkpoints(directory: Path, stage: str, keep: int):
    for path in list_checkpoints(directory, stage)[keep:]:
        path.unlink(missing_ok=True)


@dataclass
class TrainState:
    """The live objects a checkpoint saves and restores (owned by the training loop)."""

    step: int
    skipped: int
    n_logged: int
    model: nn.Module
    ema: object | None               # training.ema.EMA
    opt: torch.optim.Optimizer
    data_gen: torch.Generator
    noise_gen: torch.Generator
    loss_sum: torch.Tensor
    logs_sum: dict = field(default_factory=dict)
    run_id: str = ""


@dataclass
class Restored:
    path: Path
    step: int
    skipped: int
    n_logged: int
    loss_sum: torch.Tensor
    logs_sum: dict
    meta: dict


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class CheckpointStore:
    """The checkpoints of one stage in one directory."""

    def __init__(self, directory: Path, stage: str, config: dict):
        self.directory, self.stage, self.config = Path(directory), stage, config

    def newest(self) -> Path | None:
        found = list_checkpoints(self.directory, self.stage)
        return found[0] if found else None

    def remove_temporaries(self):
        for tmp in stale_temporaries(self.directory, self.stage):  # left by a process killed mid-save
            tmp.unlink(missing_ok=True)

    def save(self, s: TrainState, keep: int):
        tensors = {f"model.{k}": v for k, v in s.model.state_dict().items()}
        if s.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in s.ema.state_dict().items()})
        if not _all_finite(tensors.values()):  # belt and braces: never store bad weights
            raise TrainingError(f"{self.stage} weights are not finite at step {s.step}; not writing a checkpoint "
                                f"(the last good one in {self.directory} is kept)")
        opt_tensors, opt_meta = ld_state.flatten_optimizer(s.opt.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        tensors["rng.data"] = s.data_gen.get_state()
        tensors["rng.noise"] = s.noise_gen.get_state()
        if s.noise_gen.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(s.noise_gen.device)
        tensors["log.loss"] = s.loss_sum
        tensors.update({f"log.{k}": v for k, v in s.logs_sum.items()})
        meta = {"step": s.step, "stage": self.stage, "optimizer": opt_meta, "config": self.config,
                "skipped": s.skipped, "log_count": s.n_logged, "run_id": s.run_id}
        try:
            ld_state.save_state(checkpoint_path(self.directory, self.stage, s.step), tensors, meta)
        except WriteError as e:
            last = self.newest()
            hint = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise WriteError(f"{e}. Training stopped at step {s.step}; {hint}: free space, then continue with "
                             "--resume") from None
        prune_checkpoints(self.directory, self.stage, keep)

    def _find(self, check) -> tuple[dict, dict, Path] | None:
        """The newest intact checkpoint, saying which newer ones were corrupt (rank 0 renames those to
        *.corrupt); an error if checkpoints exist but none is intact."""
        existing = list_checkpoints(self.directory, self.stage)
        found = load_latest(self.directory, self.stage, device="cpu", check=check)
        if found is None:
            if existing:
                raise ModelError(f"none of the {len(existing)} {self.stage} checkpoints in {self.directory} is "
                                 "intact; move them away to start from step 0")
            return None
        newer = existing[:existing.index(found[2])] if found[2] in existing else []
        if newer:
            log.info(f"resuming from the newest intact checkpoint {found[2].name}, not from the corrupt "
                     f"{', '.join(p.name for p in newer)} (renamed to *.corrupt)")
            if distributed.is_main():
                for bad in newer:
                    bad.replace(bad.with_name(bad.name + ".corrupt"))
        return found

    def restore(self, s: TrainState, device: torch.device, check=None) -> Restored | None:
        """Load the newest intact checkpoint into the live objects of `s`; None if there is none."""
        found = self._find(check)
        if found is None:
            return None
        tensors, meta, path = found
        s.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if s.ema is not None:
            s.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        s.opt.load_state_dict(ld_state.unflatten_optimizer(tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng.cpu"])
        s.data_gen.set_state(tensors["rng.data"])
        s.noise_gen.set_state(tensors["rng.noise"].to(s.noise_gen.get_state().device))
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        loss_sum, logs_sum = s.loss_sum, s.logs_sum
        if "log.loss" in tensors:
            loss_sum = tensors["log.loss"].to(device)
            logs_sum = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("log.") and k != "log.loss"}
        return Restored(path, int(meta["step"]), int(meta.get("skipped", 0)), int(meta.get("log_count", 0)),
                        loss_sum, logs_sum, meta)
