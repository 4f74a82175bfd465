"""The run directory's contract (docs/reliability.md): one command at a time, one run per stage,
and a resume that continues exactly the run it names.

- **Lock.** A training command holds an exclusive ``fcntl.flock`` on RUN_DIR/.lock while it runs
  (rank 0 under torchrun). The kernel drops it when the process dies, so a killed run never
  leaves a stale lock behind.
- **Run identity.** Every fresh start gets a run id, stored in each checkpoint. A fresh start over
  another run's checkpoints of the same stage is refused unless ``overwrite`` is given (which
  deletes them); otherwise the rotation would mix two runs and a later ``--resume`` would
  continue whichever has the highest step.
- **Resume.** Only the fields in :data:`MAY_CHANGE_ON_RESUME` may differ from the config stored in
  the checkpoint; any other difference is refused, naming the fields. A field that a checkpoint of an
  earlier version lacks counts as its default.
- **Temporaries.** Our own ``.NAME.*.tmp`` files (left by a process killed mid-write) are removed
  at start, under the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import uuid
from pathlib import Path

from latentdiff.errors import ConfigError, ModelError
from latentdiff.training import checkpoints as ckpt
from latentdiff.training import distributed

log = logging.getLogger(__name__)

# Fields (dotted, under any training section) that only say how long to run and how often to
# report or save: changing them on resume keeps the run the same run.
MAY_CHANGE_ON_RESUME = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "tensorboard")
# Top-level fields that name where things are, or how data is read, not what is trained.
MAY_CHANGE_TOP = ("data.data_dir", "device", "data.workers", "data.cache_shard_size")

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # utils.files.atomic_path's mkstemp names


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold RUN_DIR/.lock exclusively for the block (rank 0 only); a second command gets a ConfigError."""
    if not distributed.is_main():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(f"run directory {run_dir} is in use by another latentdiff command (process {holder}); "
                              "wait for it to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_temporaries(run_dir)
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_temporaries(run_dir: Path):
    """Our atomic-write temporaries left behind by a killed process, in RUN_DIR and its subfolders we write."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        if folder.is_dir():
            for p in folder.iterdir():
                if _TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def prepare_fresh_start(ckpt_dir: Path, stage: str, overwrite: bool):
    """Refuse to start over another run's checkpoints of `stage` unless `overwrite` (then delete them)."""
    existing = ckpt.list_checkpoints(ckpt_dir, stage) if ckpt_dir.is_dir() else []
    if not existing:
        return
    if not overwrite:
        raise ConfigError(f"{ckpt_dir} already holds {len(existing)} {stage} checkpoint(s) of another run (newest "
                          f"{existing[0].name}); continue it with --resume, or start over with --overwrite "
                          "(deletes them), or choose another --run-dir")
    if distributed.is_main():
        for p in existing:
            p.unlink(missing_ok=True)
        log.info(f"--overwrite: deleted {len(existing)} {stage} checkpoint(s) of the previous run in {ckpt_dir}")
    distributed.barrier()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return key in MAY_CHANGE_TOP or key.rsplit(".", 1)[-1] in MAY_CHANGE_ON_RESUME


def resume_check(stage: str, config: dict, sections: tuple[str, ...] | None = None):
    """The check for ``checkpoints.load_latest``: skip (ModelError) a file that is not a checkpoint of
    `stage`; refuse (ConfigError) one whose stored config differs in a field that may not change.
    `sections`: the top-level config keys this stage depends on (default: all)."""

    def check(tensors: dict, meta: dict):
        if meta.get("stage") != stage or not isinstance(meta.get("step"), int) or "optimizer" not in meta \
                or "rng.data" not in tensors:
            raise ModelError(f"not a {stage} checkpoint (stage {str(meta.get('stage'))[:40]!r})")
        saved = meta.get("config")
        if not isinstance(saved, dict):
            raise ModelError("no stored config")
        keep = (lambda k: k.split(".", 1)[0] in sections) if sections else (lambda k: True)
        old, new = _flatten(saved), _flatten(config)
        defaults = _defaults()
        old.update({k: defaults[k] for k in new.keys() - old.keys() if k in defaults})
        differ = sorted(k for k in old.keys() | new.keys()
                        if keep(k) and not _may_change(k) and _norm(old.get(k)) != _norm(new.get(k)))
        if differ:
            shown = ", ".join(f"{k} ({old.get(k)!r:.40} -> {new.get(k)!r:.40})" for k in differ[:6])
            raise ConfigError(f"cannot resume {stage}: the config differs from the checkpoint's in {shown}"
                              f"{' and more' if len(differ) > 6 else ''}; only "
                              f"{', '.join(MAY_CHANGE_ON_RESUME + MAY_CHANGE_TOP)} may change on --resume "
                              "(start over with --overwrite, or use another --run-dir)")

    return check


def _defaults() -> dict:
    """Every config field's default, flattened: what an earlier version's checkpoint meant by a missing field."""
    from latentdiff.pipeline.config import Config

    return _flatten(Config().to_dict())


def _norm(v):
    return list(v) if isinstance(v, tuple) else v  # tuples come back from JSON as lists
