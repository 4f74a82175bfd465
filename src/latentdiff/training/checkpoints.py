"""Safe, atomic, verifiable state files: safetensors tensors + a JSON metadata header.

Nothing here unpickles: loading a file can only produce tensors and JSON. Every file written by
:func:`save_state` carries a SHA-256 of its tensor bytes and one of its JSON metadata in the
header, so bit rot and truncation are detected on load (safetensors itself rejects a truncated
or malformed header). Files are written to a temporary name, checked to be complete, fsynced and
renamed, so a crash or a full disk never replaces a good file by a partial one.
"""

from __future__ import annotations

import re
from pathlib import Path

from latentdiff.errors import ModelError
from latentdiff.utils.state import load_state


def checkpoint_path(directory: Path, stage: str, step: int) -> Path:
    return Path(directory) / f"{stage}-{step:08d}.safetensors"


def list_checkpoints(directory: Path, stage: str) -> list[Path]:
    """Checkpoints of `stage`, newest first."""
    pattern = re.compile(rf"^{re.escape(stage)}-(\d{{8}})\.safetensors$")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{stage}-*.safetensors")
             if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(directory: Path, stage: str, device="cpu", warn=print):
    """The newest intact checkpoint (tensors, meta, path), skipping corrupt ones with a warning; None if none."""
    for path in list_checkpoints(directory, stage):
        try:
            tensors, meta = load_state(path, device)
            return tensors, meta, path
        except ModelError as e:
            warn(f"warning: skipping checkpoint: {e}; falling back to the next older one")
    return None


def stale_temporaries(directory: Path, stage: str) -> list[Path]:
    """Temporary files of `stage` checkpoints left behind by a killed process (see io.atomic_path)."""
    return sorted(Path(directory).glob(f".{stage}-*.safetensors.*.tmp"))


def prune_checkpoints(directory: Path, stage: str, keep: int):
    for path in list_checkpoints(directory, stage)[keep:]:
        path.unlink(missing_ok=True)
