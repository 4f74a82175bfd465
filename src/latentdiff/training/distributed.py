"""Multi-process training under torchrun: process-group setup, rank queries, batch sharding.

`torchrun --nproc-per-node N -m latentdiff train ...` starts N copies of the same command with
RANK, LOCAL_RANK and WORLD_SIZE set; :func:`setup` joins them into one process group (NCCL on
GPUs, gloo on CPU). Without those variables every function here is a cheap no-op, so the
training loop has one code path for one process and for many.

Sharding: every process draws the *same* global batch of indices and the same global noise from
identically seeded generators and computes only its own rows (:func:`shard`). DDP then averages
the gradients, which equals the one-process gradient of the whole batch up to the order of float
additions; the global batch size never depends on N.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from latentdiff.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def requested_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return _env_int("WORLD_SIZE", 1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1 and return this process's device.

    On CUDA each process takes GPU LOCAL_RANK (NCCL); on CPU the processes talk over gloo.
    Idempotent: a second call (the second stage of `latentdiff demo`) reuses the group.
    """
    n = requested_world_size()
    if n <= 1:
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                              "start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if active():
        return device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"could not join the {backend} process group ({e}); launch multi-process training "
                          "with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
    if not is_main():  # one voice: rank 0 logs for all (errors still come from every process)
        logging.getLogger("latentdiff").setLevel(logging.ERROR)
    return device


def shutdown():
    """Leave the process group. No barrier here: after an error on one process the others may be
    inside a collective, and torchrun stops them; the training functions end with their own barrier."""
    if active():
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


def shard(batch_size: int, what: str = "batch size") -> slice:
    """The rows of a global batch of `batch_size` that this process computes."""
    n, r = world_size(), rank()
    if batch_size % n:
        raise ConfigError(f"the global {what} ({batch_size}) must be divisible by the number of processes ({n}); "
                          f"choose a multiple of {n}")
    per = batch_size // n
    return slice(r * per, (r + 1) * per)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'mean', 'min', 'max'); returns `tensor` (unchanged with one process)."""
    if not active():
        return tensor
    red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
           "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=red)
    if op == "mean":
        tensor /= world_size()
    return tensor


def same_on_all(value: int, what: str):
    """Raise on every process if `value` differs between processes (e.g. the resumed step)."""
    if not active():
        return
    t = torch.tensor([value, -value], dtype=torch.int64,
                     device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                     else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    low, high = int(t[0]), -int(t[1])
    if low != high:
        raise ConfigError(f"the processes disagree on {what} ({low} vs {high}); with several machines the run "
                          "directory must be on a file system that all of them share")


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when running in a process group, else `module` itself.

    DDP's constructor copies rank 0's parameters and buffers to every process.
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    # A convolution with one input channel gets a weight gradient whose stride along that size-1
    # dimension differs from the bucket's; the memory layout is the same, so the warning is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
