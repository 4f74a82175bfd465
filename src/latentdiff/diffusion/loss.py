"""The denoiser's training loss as small functions returning a *per-sample* loss.

The training loop owns reduction (the mean over the batch) and scaling; these functions only say what
one sample costs. Random draws (t, ε, which labels are dropped) are made for the whole global batch
and the loss is computed for `rows` only, so that each process under DDP gets exactly the numbers of
its share of one process's batch (see ``training/distributed.py``).
"""

from __future__ import annotations

import torch

from latentdiff.diffusion.cond import Cond, same_length
from latentdiff.diffusion.denoiser import Denoiser, training_target
from latentdiff.errors import ConfigError


def drop_cond(cond: Cond, null: Cond, p: float, gen: torch.Generator) -> Cond:
    """Classifier-free guidance training (Ho & Salimans 2022): each sample's condition becomes the null
    condition with probability `p`, so that one network learns both p(z | c) and p(z). All fields drop
    together (labels and text), so the null condition is "no label and the empty prompt"."""
    batch = cond.batch_size
    keep = torch.rand((batch,), generator=gen, device=gen.device) >= p  # (B,)
    mine, theirs = cond.net_kwargs(), null.net_kwargs()
    out = {}
    for k, v in mine.items():
        if v is None:
            out[k] = None
            continue
        k_mask = keep.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))  # (B,) -> (B, 1, ...)
        out[k] = torch.where(k_mask, *same_length(v, theirs[k]))
    return Cond(**out)


def min_snr_weight(abar: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ weight (Hang et al. 2023, eq. 9) expressed in the network's own target space.

    The x0-space error is weighted by min(SNR, γ) with SNR = ᾱ/(1-ᾱ). An ε error is ||ε̂-ε||² =
    SNR·||x̂0-x0||², and a v error is (SNR+1)·||x̂0-x0||², so the weight on those losses is
    min(SNR, γ)/SNR and min(SNR, γ)/(SNR+1); for x0-prediction it is min(SNR, γ) itself.
    """
    snr = (abar / (1 - abar)).float()
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ConfigError(f"unknown prediction type {prediction!r}")


def diffusion_loss(den: Denoiser, z0: torch.Tensor, cond: Cond | None, gen: torch.Generator,
                   min_snr_gamma: float = 0.0, rows: slice = slice(None)) -> torch.Tensor:
    """Per-sample 'simple' loss ||target - net(z_t, t)||² (Ho et al. 2020, eq. 14), min-SNR weighted if γ > 0.

    t ~ U{0, …, T-1} and ε ~ N(0, I) are drawn for the whole batch `z0` (and its condition `cond`);
    z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε.
    Returns a (len(rows),) float32 tensor.
    """
    sched = den.schedule
    t = torch.randint(sched.num_steps, (z0.shape[0],), generator=gen, device=z0.device)
    eps = torch.randn(z0.shape, generator=gen, device=z0.device)
    z0, eps, t = z0[rows], eps[rows], t[rows]
    kwargs = cond.select(rows).net_kwargs() if cond is not None else {}
    abar = sched.abar(t)
    zt = sched.add_noise(z0, eps, t)
    out = den.net(zt, t, **kwargs).float()  # the raw output: the target is in the network's own space
    target = training_target(den.prediction, z0, eps, abar)
    per_sample = (out - target).square().flatten(1).mean(1)  # (B, c, h, w) -> (B,)
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(abar.to(z0.device), min_snr_gamma, den.prediction)
    return per_sample
