"""The condition a denoiser is given: one small dataclass that guidance and samplers pass along unopened.

It holds class labels and a text context with its mask; a new kind of conditioning is a field plus the network's
use of it, not new branches in guidance, samplers or the pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from latentdiff.errors import ConfigError


@dataclass(frozen=True)
class Cond:
    """Per-sample conditioning; every field is a tensor with the batch as its first dimension, or None.

    The field names are the network's keyword arguments (see :meth:`net_kwargs`). The null condition of
    classifier-free guidance comes from the denoiser (``Denoiser.null_cond``), which knows its network.
    """

    labels: torch.Tensor | None = None  # (B,) long class indices; a conditional U-Net's null label is num_classes
    context: torch.Tensor | None = None  # (B, L, D) text encoder states, or (B, L) token ids the network embeds
    context_mask: torch.Tensor | None = None  # (B, L) bool, True for real tokens (padding is never attended to)

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int | None:
        """The batch size the condition was made for; None for the empty condition (fits any batch)."""
        sizes = {len(v) for v in self._tensors().values() if v is not None}
        if len(sizes) > 1:
            raise ConfigError(f"a condition's fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    @property
    def device(self) -> torch.device | None:
        """Where the condition's tensors are; None for the empty condition."""
        return next((v.device for v in self._tensors().values() if v is not None), None)

    def is_empty(self) -> bool:
        return all(v is None for v in self._tensors().values())

    def _map(self, fn) -> "Cond":
        return Cond(**{k: (fn(v) if v is not None else None) for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> "Cond":
        return self._map(lambda v: v.to(device))

    def select(self, index: slice | torch.Tensor) -> "Cond":
        """The condition of some samples of the batch (a slice or an index tensor)."""
        return self._map(lambda v: v[index])

    def cat(self, other: "Cond") -> "Cond":
        """This batch followed by `other`'s (e.g. conditional then unconditional for one guided forward pass)."""
        mine, theirs = self._tensors(), other._tensors()
        out = {}
        for k, v in mine.items():
            if (v is None) != (theirs[k] is None):
                raise ConfigError(f"cannot concatenate a condition with {k} and one without")
            out[k] = None if v is None else torch.cat(same_length(v, theirs[k]))
        return Cond(**out)

    def net_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of the network's forward (``net(x_t, t, **cond.net_kwargs())``)."""
        return self._tensors()


def same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of two token tensors (B, L, ...) along L with zeros (False in a mask: padding)."""
    if a.ndim < 2 or a.shape[1] == b.shape[1]:
        return a, b
    length = max(a.shape[1], b.shape[1])

    def pad(v):
        extra = torch.zeros((v.shape[0], length - v.shape[1], *v.shape[2:]), dtype=v.dtype, device=v.device)
        return torch.cat([v, extra], dim=1)

    return pad(a), pad(b)
