"""How much memory a generation needs, estimated from the model's config before anything is allocated.

Memory is otherwise bounded only by the parameter count: a model directory whose config.json declares 4096×4096
images builds fine (the weights do not depend on the image size) and then asks for terabytes in its first
attention call. :func:`check_memory` refuses such a request in one line, naming the largest batch that fits.
The estimate is deliberately conservative (an upper bound for one sampler step plus the decoder):
- a U-Net forward keeps its skip activations, (num_res_blocks + 1) maps per level, and works on a few more;
- self-attention is counted as the math kernel computes it, scores and softmax of (heads, HW, HW) in float32,
  because that is what PyTorch falls back to for these layouts (the fused kernels need less);
- the decoder's widest full-resolution stage dominates the codec.
Classifier-free guidance runs the conditional and unconditional halves as one batch, so it doubles the batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from latentdiff.errors import ConfigError

GIB = 1 << 30
HEADROOM = 0.9  # never plan to use more than this share of the available memory
_WORK_MAPS = 8  # feature maps alive at once inside one block (norm, activation, conv outputs, residual)
_OVERHEAD = 1.3  # allocator rounding and temporaries; measured peaks were 1.14-1.28× the raw count (tests/test_reliability.py checks the bound)


def _heads(channels: int, head_dim: int) -> int:
    """The head count of nn.layers.Attention: about channels / head_dim, a divisor of `channels`."""
    return next(h for h in range(max(1, channels // head_dim), 0, -1) if channels % h == 0)


def _attention_bytes(batch: int, channels: int, positions: int, head_dim: int) -> int:
    return batch * _heads(channels, head_dim) * positions * positions * 4 * 2  # scores + softmax, float32


def denoiser_bytes(unet, latent_hw: tuple[int, int], batch: int) -> int:
    """Peak activation bytes of one U-Net forward (no gradients) on `batch` latents of size `latent_hw`."""
    skips, peak = 0, 0
    levels = len(unet.channel_mults)
    for level, mult in enumerate(unet.channel_mults):
        c = unet.base_channels * mult
        positions = math.ceil(latent_hw[0] / 2 ** level) * math.ceil(latent_hw[1] / 2 ** level)
        skips += (unet.num_res_blocks + 1) * c * positions * batch * 4
        attention = level in unet.attention_levels or level == levels - 1  # the middle block attends too
        work = _WORK_MAPS * c * positions * batch * 4
        peak = max(peak, work + (_attention_bytes(batch, c, positions, unet.head_dim) if attention else 0))
    return skips + peak


def decoder_bytes(autoencoder, image_hw: tuple[int, int], batch: int) -> int:
    """Peak activation bytes of decoding `batch` latents to images of size `image_hw`."""
    peak = 0
    for level in range(int(math.log2(autoencoder.factor)) + 1):
        c = autoencoder.base_channels * min(2 ** level, 4)
        positions = math.ceil(image_hw[0] / 2 ** level) * math.ceil(image_hw[1] / 2 ** level)
        peak = max(peak, _WORK_MAPS * c * positions * batch * 4)
    if autoencoder.attention:
        level = int(math.log2(autoencoder.factor))
        c = autoencoder.base_channels * min(2 ** level, 4)
        positions = math.ceil(image_hw[0] / autoencoder.factor) * math.ceil(image_hw[1] / autoencoder.factor)
        peak += _attention_bytes(batch, c, positions, c)  # the codec attends with a single head
    return peak


def request_bytes(cfg, image_hw: tuple[int, int], batch: int, guided: bool) -> int:
    """Bytes one batch of a generation needs at its peak: the larger of a sampler step and the decoder."""
    f = cfg.autoencoder.factor
    latent_hw = (math.ceil(image_hw[0] / f), math.ceil(image_hw[1] / f))
    raw = max(denoiser_bytes(cfg.unet, latent_hw, batch * (2 if guided else 1)),
              decoder_bytes(cfg.autoencoder, image_hw, batch))
    return int(_OVERHEAD * raw)


def _cgroup_limit() -> int | None:
    """Memory left under this process's cgroup (v2) limit, if one is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory, or the host's available memory (and cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    cgroup = _cgroup_limit()
    return min(free, cgroup) if cgroup is not None else free


def _gib(n: int) -> str:
    return f"{n / GIB:,.0f} GiB" if n >= 100 * GIB else f"{n / GIB:.3g} GiB"


def check_memory(cfg, image_hw: tuple[int, int], batch: int, guided: bool, device: torch.device,
                 available: int | None = None) -> None:
    """Refuse, in one line, a batch whose estimated peak passes the free memory; name the batch size that fits."""
    budget = int(HEADROOM * (available_bytes(device) if available is None else available))
    need = request_bytes(cfg, image_hw, batch, guided)
    if need <= budget:
        return
    fits = 0
    lo, hi = 1, batch - 1
    while lo <= hi:  # request_bytes grows with the batch: bisect for the largest that fits
        mid = (lo + hi) // 2
        if request_bytes(cfg, image_hw, mid, guided) <= budget:
            fits, lo = mid, mid + 1
        else:
            hi = mid - 1
    advice = (f"use --batch-size {fits} or less" if fits else
              f"even one {image_hw[0]}×{image_hw[1]} image does not fit: use a model with smaller images or a "
              "machine with more memory")
    raise ConfigError(f"this request needs about {_gib(need)} at once (batch {batch}"
                      f"{', doubled by classifier-free guidance' if guided else ''}, {image_hw[0]}×{image_hw[1]} "
                      f"images), more than the {_gib(budget)} of {device.type} memory it may use; {advice}")
