"""Guidance as denoiser -> denoiser wrappers, so every sampler gets every kind of guidance."""

from __future__ import annotations

import torch

from .denoiser import Denoiser, DenoiserFn, Prediction


def classifier_free(model: Denoiser, labels: torch.Tensor, scale: float) -> DenoiserFn:
    """Classifier-free guidance (Ho & Salimans 2022): x̂ = x̂_u + w (x̂_c - x̂_u), one batched forward.

    scale = 1 is the conditional model, scale = 0 the unconditional one. The combination is applied
    to x̂0 and ε̂ alike; both are affine in the network output, so this equals guiding the output.
    """
    if scale == 1.0:
        return model.bind(labels)
    null = torch.full_like(labels, model.net.cfg.num_classes)

    def fn(xt: torch.Tensor, t: torch.Tensor) -> Prediction:
        both = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([labels, null]))
        (x0_c, x0_u), (eps_c, eps_u) = both.x0.chunk(2), both.eps.chunk(2)
        return Prediction(x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u))

    return fn
