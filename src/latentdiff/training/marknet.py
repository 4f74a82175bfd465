"""Training of the decoder-mark networks (``models/marknet.py``): embedder and extractor together, through the
attacks the mark must survive.

Each step draws cover images (real images and the autoencoder's reconstructions of them: what the decoder
makes), random message bits, and one attack per image: none, JPEG at quality 50–95, a downscale to 0.4–0.8× and
back (antialiased bilinear, like PIL's), or Gaussian noise σ ≤ 4/255; every image is then rounded to 8 bits.
Rounding is not differentiable and passes the gradient straight through (the identity), as in Stable
Signature. JPEG's forward pass is the real encoder; its gradient is that of a differentiable model of it
(``training/jpeg_model.py``), so the embedder learns which parts of its residual JPEG erases. The loss is the
bits' cross-entropy on the marked images, plus a term that pulls the extractor's tanh(logits) on *unmarked*
covers (same attacks) to 0, so that an unmarked image reads as "no message" rather than as some fixed one, plus
a hinge λ·max(0, MSE/target − 1) on the residual, with λ adapted during training so that the residual's MSE
settles at the PSNR asked for (``psnr``).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.models.marknet import MarkEmbedder, MarkExtractor
from latentdiff.training.jpeg_model import jpeg_model
from latentdiff.utils.images import jpeg_roundtrip

log = logging.getLogger(__name__)


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in the forward pass, the gradient of x in the backward pass."""
    return x + (y - x).detach()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounding to 8-bit levels in [-1, 1], with a straight-through gradient."""
    return straight_through(x, torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)


def jpeg_tensor(x: torch.Tensor, quality: int, gradient: str = "model") -> torch.Tensor:
    """Each image of N×C×H×W in [-1, 1] through a JPEG encode and decode at `quality`. The gradient is that of
    the JPEG model (`gradient` "model") or the identity ("identity", how the version-1 and the first version-2
    nets were trained)."""
    arr = torch.round((x.detach().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    y = torch.from_numpy(jpeg_roundtrip(arr, quality)).permute(0, 3, 1, 2).float().to(x.device) / 127.5 - 1
    if gradient == "identity":
        return straight_through(x, y)
    return straight_through(jpeg_model((x + 1) * 127.5, int(quality)) / 127.5 - 1, y)


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Downscale by `factor` (antialiased bilinear) and back up (bilinear), differentiably."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def attack(x: torch.Tensor, kind: int, rng: np.random.Generator, jpeg_gradient: str = "model") -> torch.Tensor:
    """One of the training attacks (0 none, 1 JPEG, 2 rescale, 3 noise) on a batch, then 8-bit rounding."""
    if kind == 1:
        x = jpeg_tensor(x, int(rng.integers(50, 96)), jpeg_gradient)
    elif kind == 2:
        x = rescale(x, float(rng.uniform(0.4, 0.8)))
    elif kind == 3:
        x = x + torch.randn_like(x) * float(rng.uniform(0, 4 / 255)) * 2
    return quantize(x)


def attacked(x: torch.Tensor, kinds: np.ndarray, rng: np.random.Generator,
             jpeg_gradient: str = "model") -> torch.Tensor:
    """Each image of the batch through its own attack (grouped by kind)."""
    out = torch.empty_like(x)
    for kind in np.unique(kinds):
        idx = torch.from_numpy(np.flatnonzero(kinds == kind))
        out[idx] = attack(x[idx], int(kind), rng, jpeg_gradient)
    return out


def mse_for_psnr(psnr: float) -> float:
    """The MSE in the [-1, 1] range that gives `psnr` dB on the [0, 1] range."""
    return 4 * 10 ** (-psnr / 10)


def train_marknet(covers: np.ndarray, bits: int = 64, steps: int = 3000, batch: int = 64, psnr: float = 38.0,
                  lr: float = 1e-3, seed: int = 0, width: int = 32, warmup: float = 0.2,
                  zero_mean: bool = False, start_psnr: float = 10.0,
                  jpeg_gradient: str = "model", odd: bool = False) -> tuple[MarkEmbedder, MarkExtractor, dict]:
    """Train an embedder and extractor on uint8 N×H×W×C `covers`; returns them (eval mode) and a summary.

    For the first `warmup` of the steps the null term is off (with it from the start, the extractor settles on
    "no message" for everything and never learns); it then ramps in over as many steps again. The residual's
    PSNR target rises from `start_psnr` to `psnr` over the same 2·`warmup`: with no bound at the start the
    residual grows until the clamp to [-1, 1] saturates, no gradient passes, and the bits are never learned. The
    penalty is a hinge on the MSE above the target, with a weight λ adapted to hold it there: a penalty below
    the target shrinks the untrained residual to nothing before the bits can be learned.
    `zero_mean` subtracts each channel's mean from the residual and `odd` makes it change sign with the message
    (``models.marknet.MarkEmbedder``);
    `jpeg_gradient` is "model" (the JPEG model's gradient) or "identity" (``jpeg_tensor``)."""
    if jpeg_gradient not in ("model", "identity"):
        raise ValueError(f"jpeg_gradient must be 'model' or 'identity', got {jpeg_gradient!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, size, _, channels = covers.shape
    emb = MarkEmbedder(channels, size, bits, width, zero_mean=zero_mean, odd=odd)
    ext = MarkExtractor(channels, size, bits, width)
    opt = torch.optim.Adam([*emb.parameters(), *ext.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    data = torch.from_numpy(covers).permute(0, 3, 1, 2).float() / 127.5 - 1
    log_lam, t0, hist = 0.0, time.time(), []
    for step in range(steps):
        x = data[torch.from_numpy(rng.integers(0, n, batch))]
        m = torch.from_numpy(rng.integers(0, 2, (batch, bits))).float()
        delta = emb(x, m)
        marked = (x + delta).clamp(-1, 1)
        kinds = rng.integers(0, 4, 2 * batch)
        logits = ext(attacked(torch.cat([marked, x]), kinds, rng, jpeg_gradient))
        bce = F.binary_cross_entropy_with_logits(logits[:batch], m)
        null = torch.tanh(logits[batch:]).pow(2).mean()
        mse = delta.pow(2).mean()
        ramp = min(1.0, max(0.0, (step / steps - warmup) / warmup))  # no null term until the bits are learned
        target = mse_for_psnr(start_psnr + (psnr - start_psnr) * min(1.0, step / (2 * warmup * steps)))
        loss = bce + ramp * null + math.exp(log_lam) * F.relu(mse / target - 1)  # a hinge: free below the target
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log_lam = min(8.0, max(-8.0, log_lam + 0.02 * (1 if mse.item() > target else -1)))  # MSE at the target
        acc = float(((logits[:batch] > 0).float() == m).float().mean())
        hist.append((bce.item(), null.item(), mse.item(), acc))
        if step % 200 == 0 or step == steps - 1:
            b, nl, ms, a = np.mean(hist[-200:], 0)
            log.info("step %d: bce %.3f null %.3f psnr %.1f dB bit acc %.3f lambda %.2f (%.0f s)", step, b, nl,
                     10 * math.log10(4 / max(ms, 1e-12)), a, math.exp(log_lam), time.time() - t0)
    b, nl, ms, a = np.mean(hist[-200:], 0)
    summary = {"bits": bits, "size": size, "channels": channels, "steps": steps, "batch": batch, "psnr_target": psnr,
               "psnr": round(10 * math.log10(4 / max(ms, 1e-12)), 2), "train_bit_accuracy": round(float(a), 4),
               "seconds": round(time.time() - t0), "covers": int(n), "width": width,
               "zero_mean": zero_mean, "odd": odd, "jpeg_gradient": jpeg_gradient}
    return emb.eval(), ext.eval(), summary
