"""Where and how the networks run: the device, bf16 autocast, and torch.compile with an eager fallback."""

from __future__ import annotations

import warnings

import torch

from latentdiff.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def under_bf16_autocast(fn, device_type: str):
    """`fn` with its network calls under bf16 autocast; the Denoiser returns float32 predictions, so the
    sampler's updates stay in float32."""

    def run(x, t):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(x, t)

    return run


class CompiledNet(torch.nn.Module):
    """`net` behind ``torch.compile``, falling back to eager (one warning) if compiling or running it fails.

    Compilation is lazy, so failures (no C compiler, unsupported platform) surface on the first call;
    the eager rerun then either succeeds or raises the real error. Weights stay shared with `net`.
    """

    def __init__(self, net: torch.nn.Module, mode: str = "default"):
        super().__init__()
        self.eager = net
        # CUDA graphs (reduce-overhead) replay into the same output memory: each call is a new step, and
        # its output is copied out, since samplers keep earlier predictions (multistep history, guidance).
        self.graphs = mode == "reduce-overhead"
        try:
            self._fn = torch.compile(net, mode=mode)
        except Exception as e:  # noqa: BLE001 - any failure means: run eager
            self._fall_back(e)

    def _fall_back(self, e: Exception):
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile is unavailable here ({type(e).__name__}: {first_line}); "
                      "running the network eagerly", RuntimeWarning, stacklevel=3)
        self._fn = self.eager

    def forward(self, *args, **kwargs):
        if self._fn is self.eager:
            return self.eager(*args, **kwargs)
        try:
            if not self.graphs:
                return self._fn(*args, **kwargs)
            torch.compiler.cudagraph_mark_step_begin()
            return self._fn(*args, **kwargs).clone()
        except Exception as e:  # noqa: BLE001 - whatever the compiler raises, the eager network still runs
            self._fall_back(e)
            return self.eager(*args, **kwargs)
