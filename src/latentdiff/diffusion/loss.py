"""The denoiser's training loss as small functions returning a *per-sample* loss.

The training loop owns reduction (the mean over the batch) and scaling; these functions only say what
one sample costs. Random draws (t, ε, which labels are dropped) are made for the whole global batch
and the loss is computed for `rows` only, so that each process under DDP gets exactly the numbers of
its share of one process's batch (see ``training/distributed.py``).
"""

from __future__ import annotations

import torch

from latentdiff.diffusion.denoiser import Denoiser, training_target
from latentdiff.errors import ConfigError


def drop_labels(labels: torch.Tensor, p: float, null: int, gen: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes the null label `null`
    with probability `p`, so that one network learns both p(z | y) and p(z)."""
    keep = torch.rand(labels.shape, generator=gen, device=labels.device) >= p
    return torch.where(keep, labels, torch.full_like(labels, null))


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


def diffusion_loss(den: Denoiser, z0: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator,
                   min_snr_gamma: float = 0.0, rows: slice = slice(None)) -> torch.Tensor:
    """Per-sample 'simple' loss ||target - net(z_t, t)||² (Ho et al. 2020, eq. 14), min-SNR weighted if γ > 0.

    t ~ U{0, …, T-1} and ε ~ N(0, I) are drawn for the whole batch `z0`; z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε.
    Returns a (len(rows),) float32 tensor.
    """
    sched = den.schedule
    t = torch.randint(sched.num_steps, (z0.shape[0],), generator=gen, device=z0.device)
    eps = torch.randn(z0.shape, generator=gen, device=z0.device)
    z0, eps, t = z0[rows], eps[rows], t[rows]
    labels = labels[rows] if labels is not None else None
    abar = sched.abar(t)
    zt = sched.add_noise(z0, eps, t)
    out = den.net(zt, t, labels).float()
    target = training_target(den.prediction, z0, eps, abar)
    per_sample = (out - target).square().flatten(1).mean(1)  # (B, c, h, w) -> (B,)
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(abar.to(z0.device), min_snr_gamma, den.prediction)
    return per_sample
