"""The one denoiser contract every sampler and guidance wrapper speaks.

A *denoiser* is any callable ``fn(x_t, t) -> Prediction`` where ``t`` is a (B,) long tensor of
timesteps and the prediction holds both the clean-latent estimate x̂0 and the implied noise ε̂.
The condition (a :class:`~latentdiff.diffusion.cond.Cond`) is bound before sampling (see
:func:`Denoiser.bind` and ``guidance/``), so a sampler never sees it. ε-, v- and x0-prediction are
adapters here, never branches in a sampler.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from latentdiff.diffusion import schedule as S
from latentdiff.diffusion.cond import Cond
from latentdiff.errors import ConfigError


class Prediction(NamedTuple):
    x0: torch.Tensor
    eps: torch.Tensor


DenoiserFn = Callable[[torch.Tensor, torch.Tensor], Prediction]


def prediction_from_output(out: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor, kind: str) -> Prediction:
    """Turn a network output of parameterisation `kind` into (x̂0, ε̂)."""
    if kind == "eps":
        return Prediction(S.eps_to_x0(xt, out, abar), out)
    if kind == "v":
        return Prediction(S.v_to_x0(xt, out, abar), S.v_to_eps(xt, out, abar))
    if kind == "x0":
        return Prediction(out, S.x0_to_eps(xt, out, abar))
    raise ConfigError(f"unknown prediction type {kind!r}; choose one of {', '.join(S.PREDICTIONS)}")


def training_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What a network of parameterisation `kind` is regressed onto."""
    if kind == "eps":
        return eps
    if kind == "v":
        return S.v_target(x0, eps, abar)
    if kind == "x0":
        return x0
    raise ConfigError(f"unknown prediction type {kind!r}; choose one of {', '.join(S.PREDICTIONS)}")


class Denoiser(nn.Module):
    """Network + schedule + parameterisation -> ``denoiser(x_t, t, cond) -> Prediction``.

    The network itself knows nothing of diffusion: it maps (x_t, t, **cond) to a tensor shaped like
    x_t. Predictions are computed in float32 whatever the autocast dtype of the network.
    `num_classes` > 0 marks a class-conditional network whose extra label `num_classes` is the null
    label of classifier-free guidance.
    """

    def __init__(self, net: nn.Module, schedule: S.NoiseSchedule, prediction: str = "eps", num_classes: int = 0,
                 null_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if prediction not in S.PREDICTIONS:
            raise ConfigError(f"unknown prediction type {prediction!r}; choose one of {', '.join(S.PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.num_classes = int(num_classes)
        # The empty prompt's (context (1, L, ...), mask (1, L)) on a text-conditioned network: its null condition
        self.null_text = null_text

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> Prediction:
        kwargs = cond.net_kwargs() if cond is not None else {}
        out = self.net(xt, t, **kwargs).float()
        return prediction_from_output(out, xt.float(), self.schedule.abar(t), self.prediction)

    def null_cond(self, batch: int, device: torch.device | str | None = None) -> Cond:
        """The unconditional condition for `batch` samples: the null label on a class-conditional network, the
        empty prompt's context on a text-conditioned one."""
        if not self.num_classes and self.null_text is None:
            return Cond()
        device = device if device is not None else next(self.net.parameters()).device
        labels = (torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
                  if self.num_classes else None)
        if self.null_text is None:
            return Cond(labels=labels)
        context, mask = (v.to(device).expand(batch, *v.shape[1:]) for v in self.null_text)
        return Cond(labels=labels, context=context, context_mask=mask)

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same schedule, parameterisation and classes around another network (an EMA copy, a compiled one)."""
        return Denoiser(net, self.schedule, self.prediction, self.num_classes, self.null_text)

    def bind(self, cond: Cond | None = None) -> DenoiserFn:
        """A condition-free denoiser function for samplers (the condition is fixed for the whole trajectory)."""

        def fn(xt: torch.Tensor, t: torch.Tensor) -> Prediction:
            return self(xt, t, cond)

        return fn
