"""Guidance that mixes predictions: classifier-free guidance and blending of two conditionings.

Both take denoisers and return a denoiser (``fn(x_t, t) -> Prediction``), so every sampler gets them.
"""

from __future__ import annotations

import torch

from latentdiff.diffusion.cond import Cond
from latentdiff.diffusion.denoiser import Denoiser, DenoiserFn, Prediction
from latentdiff.diffusion.schedule import per_sample
from latentdiff.errors import ConfigError


def classifier_free(model: Denoiser, cond: Cond, scale: float, null: Cond | None = None) -> DenoiserFn:
    """Classifier-free guidance (Ho & Salimans 2022): x̂ = x̂_u + w (x̂_c - x̂_u), one batched forward.

    scale = 1 is the conditional model, scale = 0 the unconditional one. The combination is applied
    to x̂0 and ε̂ alike; both are affine in the network output, so this equals guiding the output.
    `null` replaces the model's null condition: a negative prompt's condition, guided away from.
    """
    if scale == 1.0:
        return model.bind(cond)
    if cond.batch_size is None:
        raise ConfigError("classifier-free guidance needs a condition (e.g. class labels) to guide towards")
    both_cond = cond.cat(null if null is not None else model.null_cond(cond.batch_size, cond.device))

    def fn(xt: torch.Tensor, t: torch.Tensor) -> Prediction:
        both = model(torch.cat([xt, xt]), torch.cat([t, t]), both_cond)
        (x0_c, x0_u), (eps_c, eps_u) = both.x0.chunk(2), both.eps.chunk(2)
        return Prediction(x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u))

    return fn


def blend(fn_a: DenoiserFn, fn_b: DenoiserFn, weight: float | torch.Tensor) -> DenoiserFn:
    """(1 - w) · fn_a + w · fn_b: interpolate two conditionings at the level of their predictions.

    `weight` is a number or a (B,) tensor (one weight per sample, e.g. per frame of an
    interpolation). Like classifier-free guidance this mixes x̂0 and ε̂, which are affine in the
    network output, so it is the prediction of a model whose output is the mix; it is not the
    same as mixing label embeddings inside the network, which this API cannot reach.
    """

    def fn(xt: torch.Tensor, t: torch.Tensor) -> Prediction:
        a, b = fn_a(xt, t), fn_b(xt, t)
        w = torch.as_tensor(weight, dtype=a.x0.dtype, device=xt.device)
        w = per_sample(w, a.x0) if w.ndim else w  # (B,) -> (B, 1, 1, 1)
        return Prediction(a.x0 + w * (b.x0 - a.x0), a.eps + w * (b.eps - a.eps))

    return fn
