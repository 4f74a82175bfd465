"""Safe, atomic, verifiable state files: safetensors tensors + a JSON metadata header.

Nothing here unpickles: loading a file can only produce tensors and JSON. Every file written by
:func:`save_state` carries a SHA-256 of its tensor bytes and one of its JSON metadata in the
header, so bit rot and truncation are detected on load (safetensors itself rejects a truncated
or malformed header). Files are written to a temporary name, checked to be complete, fsynced and
renamed, so a crash or a full disk never replaces a good file by a partial one.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from safetensors.torch import save_file

from latentdiff.errors import ModelError
from latentdiff.utils.files import atomic_path, write_failure

_KEY = "latentdiff"


_HEADER_KEYS = {_KEY, "sha256", "meta_sha256"}  # all a file written by save_state has (older ones lack meta_sha256)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_complete(path: Path):
    """Raise OSError unless `path` is exactly as long as its safetensors header says (a writer that
    drops an error on its final flush would otherwise leave a short file)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            entries = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise OSError(errno.EIO, "incomplete write (unreadable header)") from None
    size = path.stat().st_size
    if size != 8 + n + end:
        raise OSError(errno.EIO, f"incomplete write ({size} of {8 + n + end} bytes)")


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None):
    """Write tensors + JSON-able `meta` to `path` atomically (tmp file, completeness check, fsync, rename).

    A failed write (disk full, ...) raises :class:`WriteError` and leaves any previous file intact.
    """
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    meta_json = json.dumps(meta or {})
    header = {_KEY: meta_json, "sha256": _digest(tensors),
              "meta_sha256": hashlib.sha256(meta_json.encode()).hexdigest()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as e:  # the Rust writer reports I/O errors (e.g. ENOSPC) this way
            raise write_failure(Path(path), e) from None
        _check_complete(tmp)


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of a state's tensor bytes (names, dtypes, shapes, values): what save_state's header holds."""
    return _digest(tensors)


def is_verified(path: str | Path) -> bool:
    """Whether `path` carries a latentdiff checksum, so that :func:`load_state` verified its contents (a plain
    safetensors file from elsewhere loads too, but unverified)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return "sha256" in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError):
        return False


def load_state(path: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """Read a file written by :func:`save_state`: (tensors, meta). Corruption -> ModelError.

    A safetensors file without our header (written by another tool) has no checksum to verify: it loads,
    and :func:`is_verified` says so (``latentdiff info`` reports it per file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:  # malformed or truncated files
        raise ModelError(f"{path} is not a valid safetensors file (truncated or corrupted?): {e}") from None
    if verify and _HEADER_KEYS & header.keys() and (header.keys() - _HEADER_KEYS or "sha256" not in header):
        # a file of ours whose header keys changed: a flipped byte must not switch a checksum off
        raise ModelError(f"{path} is corrupted: unexpected header entries {sorted(header)}")
    if verify and "sha256" in header and _digest(tensors) != header["sha256"]:
        raise ModelError(f"{path} is corrupted: its checksum does not match its contents")
    if verify and "meta_sha256" in header and \
            hashlib.sha256(header.get(_KEY, "{}").encode()).hexdigest() != header["meta_sha256"]:
        raise ModelError(f"{path} is corrupted: its metadata checksum does not match its metadata")
    try:
        meta = json.loads(header.get(_KEY, "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise ModelError(f"{path} has an unreadable metadata header") from None
    if not isinstance(meta, dict):  # callers read it with .get()
        raise ModelError(f"{path} has an unreadable metadata header (not a JSON object)")
    return {k: v.to(device) for k, v in tensors.items()}, meta


def _shape(t) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path, what: str = "the config") -> None:
    """Load `tensors` into `module` strictly, refusing with one complete line what ``load_state_dict`` would report
    cut off or do silently: missing or unexpected tensors, shape mismatches, and dtype changes of kind (integer
    weights for floating-point parameters or the reverse; float16/bfloat16 files of float32 modules are fine and
    are widened). `what` names where the expected shapes come from ("config.json", ...)."""
    expected = module.state_dict()
    problems = []
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:3])}"
                        f"{', …' if len(unexpected) > 3 else ''})")
    for k, want in expected.items():
        got = tensors.get(k)
        if got is None:
            continue
        if got.shape != want.shape:
            problems.append(f"{k} is {_shape(got)} but {what} builds {_shape(want)}")
        elif got.is_floating_point() != want.is_floating_point() or (not want.is_floating_point() and got.dtype != want.dtype):
            problems.append(f"{k} is {str(got.dtype).removeprefix('torch.')} but must be "
                            f"{str(want.dtype).removeprefix('torch.')}")
        if len(problems) >= 4:
            break
    if problems:
        raise ModelError(f"{path} does not match {what}: {'; '.join(problems)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
