"""Quality vs NFE for every registered sampler, with counted network evaluations and wall time.

Samplers come from ``latentdiff.samplers.SAMPLERS`` (so new ones appear without touching this file);
the number of steps for a target NFE comes from ``samplers.steps_for_nfe`` when it exists (for
samplers that evaluate the network more than once per step), else steps = NFE. The NFE reported is
*counted*: a forward hook on the model's denoiser counts its calls per batch. With classifier-free
guidance the conditional and unconditional halves run as one batched call, counted once.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import PeakMemory, sync

from latentdiff.errors import ConfigError
from latentdiff.pipeline import LatentDiffusion
from latentdiff.sampling import samplers

FULL_CHAIN_SAMPLERS = ("ddpm", "ddim")  # only these are run at NFE > 100 (1000 = the full DDPM chain)


def steps_for(name: str, nfe: int) -> int:
    fn = getattr(samplers, "steps_for_nfe", None)
    return int(fn(name, nfe)) if fn is not None else int(nfe)


def generate_counted(pipe: LatentDiffusion, sampler: str, steps: int, n: int, seed: int, batch_size: int = 256,
                     spacing: str | None = None):
    """Images, labels, NFE per image (counted), seconds of generation (decoding included)."""
    calls = [0]
    handle = pipe.denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    labels = np.arange(n) % pipe.num_classes if pipe.num_classes else None
    try:
        sync(pipe.device)
        t0 = time.perf_counter()
        images, labels = pipe.generate(n, sampler=sampler, steps=steps, seed=seed, labels=labels,
                                       batch_size=batch_size, spacing=spacing)
        sync(pipe.device)
        seconds = time.perf_counter() - t0
    finally:
        handle.remove()
    return images, labels, calls[0] / math.ceil(n / batch_size), seconds


def nfe_sweep(model: str, device: torch.device, nfes, n: int, score, *, reference_nfe: int = 1000, seed: int = 0,
              spacings=("trailing",), log=print) -> dict:
    """Score every sampler at every NFE in ``nfes`` on every timestep grid in ``spacings``;
    ``score(images, labels) -> metrics dict``. The reference is DDPM on the trailing grid."""
    pipe = LatentDiffusion.load(model, device)
    T = pipe.denoiser.schedule.num_steps
    if not 1 <= steps_for("ddpm", reference_nfe) <= T:
        raise ConfigError(f"--reference-nfe {reference_nfe} needs more steps than the model's {T} timesteps")
    pipe.generate(min(n, 8), steps=2, labels=np.arange(min(n, 8)) % pipe.num_classes if pipe.num_classes else None)
    rows, skipped = [], []
    plan = [(name, spacing, nfe) for spacing in spacings for name in samplers.SAMPLERS for nfe in sorted(set(nfes))]
    if ("ddpm", "trailing", reference_nfe) not in plan:
        plan.append(("ddpm", "trailing", reference_nfe))
    for name, spacing, nfe in plan:
        if nfe > 100 and (name not in FULL_CHAIN_SAMPLERS or spacing != "trailing"):
            continue
        steps = steps_for(name, nfe)
        if not 1 <= steps <= T:
            skipped.append(f"{name} at NFE {nfe}: {steps} steps is outside 1..{T}")
            continue
        with PeakMemory(device) as mem:
            images, labels, counted, seconds = generate_counted(pipe, name, steps, n, seed, spacing=spacing)
        label = name if len(spacings) == 1 else f"{name}/{spacing}"
        row = {"sampler": label, "spacing": spacing, "nfe": nfe, "steps": steps, "nfe_counted": counted, "seconds": seconds,
               "images_per_s": n / seconds, "peak_bytes": mem.bytes, **score(images, labels)}
        rows.append(row)
        log(f"  {label:>22} NFE {nfe:>4} (counted {counted:g}): FD {row['fd']:.3f}, {row['images_per_s']:.1f} img/s")
    ref = next(r for r in rows if r["sampler"].split("/")[0] == "ddpm" and r["spacing"] == "trailing"
               and r["nfe"] == reference_nfe)
    for r in rows:
        r["fd_over_reference"] = r["fd"] / ref["fd"]
    targets = []
    for nfe, limit in ((10, 1.15), (20, 1.05)):
        for r in rows:
            if r["nfe"] == nfe:
                targets.append({"sampler": r["sampler"], "nfe": nfe, "fd_over_reference": r["fd_over_reference"],
                                "target": limit, "met": r["fd_over_reference"] <= limit})
    return {"model": model, "n": n, "guidance": pipe.cfg.sample.guidance, "conditional": bool(pipe.num_classes),
            "reference": {"sampler": "ddpm", "nfe": reference_nfe, "fd": ref["fd"]}, "rows": rows,
            "targets": targets, "skipped": skipped}
