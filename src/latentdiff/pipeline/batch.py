"""Several generation requests in one sampler call, each giving the images it would give alone.

A server batches compatible queued jobs: each job's starting noise z_T is drawn from its own seed's
generator (exactly as ``LatentDiffusion.generate`` draws it), the noises and class labels are
concatenated, and one sampler call runs over the whole batch. That reproduces every job's images only
when the sampler draws no noise of its own after z_T (a stochastic sampler would share one generator
across jobs), so :func:`batch_key` refuses stochastic requests.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentdiff.errors import ConfigError
from latentdiff.pipeline.request import SampleRequest
from latentdiff.sampling.samplers import sample

# Samplers that draw no noise after z_T (ddim only with eta = 0): see sampling/samplers.py.
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp-2m", "unipc")


def batch_key(request: SampleRequest) -> tuple | None:
    """What two resolved requests must share to run in one sampler call, or None if this one cannot be
    batched (a stochastic sampler, or more images than one network batch)."""
    if not request.resolved:
        raise ConfigError("batch_key needs a resolved request")
    if request.sampler not in DETERMINISTIC or (request.sampler == "ddim" and request.eta != 0):
        return None
    if request.n > request.batch_size or request.compile is not None:
        return None
    return (request.sampler, request.steps, request.spacing, request.guidance, request.classifier_scale,
            request.precision, request.labels is None)


@torch.no_grad()
def generate_batch(pipe, requests: list[SampleRequest],
                   callback: Callable[[int, int, torch.Tensor], None] | None = None,
                   watermark=None) -> list[np.ndarray]:
    """uint8 images (n_j, H, W, C) for each resolved request, from one sampler call over all of them.

    `callback(i, n, x0_hat)` is the sampler's per-step callback over the whole batch (rows in request
    order); an exception raised there stops at once. `watermark`: a key put into every job's z_T and decoder
    mark, as ``generate(watermark=...)`` does.
    """
    if not requests:
        return []
    key = batch_key(requests[0])
    if key is None or any(batch_key(r) != key for r in requests):
        raise ConfigError("these requests cannot share a sampler call (different settings or a stochastic sampler)")
    first = requests[0]
    device = pipe.device
    pipe.check_memory(first, sum(r.n for r in requests))
    noise = torch.cat([pipe.initial_noise(r.n, torch.Generator(device=device).manual_seed(r.seed), watermark)
                       for r in requests])  # (sum n_j, c, h, w)
    labels = None if first.labels is None else torch.tensor(
        [k for r in requests for k in r.labels], dtype=torch.long, device=device)
    fn = pipe.guided_denoiser(first, labels)
    z0 = sample(fn, noise, pipe.denoiser.schedule, sampler=first.sampler, steps=first.steps, spacing=first.spacing,
                callback=callback)
    images = pipe.decode(z0, first, watermark)
    bounds = np.cumsum([0] + [r.n for r in requests])
    return [images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
