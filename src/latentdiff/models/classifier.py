"""A noise-aware classifier p_φ(y | z_t, t) on noisy latents, for classifier guidance (Dhariwal & Nichol 2021).

The network is the downsampling half of the U-Net, built by the same ``unet.down_path`` (ResBlocks
with the sinusoidal time embedding added in, no attention), then GroupNorm-SiLU, global average
pooling and a linear head.
It is trained like the denoiser: the data set is encoded once into cached posteriors
(``training.latents.encode_dataset``), every step draws fresh z0 from them, t uniformly, and
z_t = schedule.add_noise(z0, ε, t); the loss is the cross-entropy of the labels. The loop is
``training.loop.TrainLoop`` (EMA, atomic checkpoints, exact resume).

On disk a classifier is one safetensors file whose JSON header holds its config, the diffusion
facts it was trained for (T, latent shape, latent scale factor) and its held-out accuracy per
noise-level bucket; a readable copy of the header is written beside it as ``.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.errors import ConfigError, ModelError
from latentdiff.models.unet import down_path, run_down
from latentdiff.nn.layers import Downsample, ResBlock, group_norm, time_mlp, timestep_embedding
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.state import load_into, load_state, save_state

CLASSIFIER_FILE = "classifier.safetensors"


# Bump when NoisyClassifier's layers or parameter names change; the file's header records it.
# 2: the down path is the U-Net's (`down.<i>.0.*` for ResBlocks); version-1 files (`blocks.<i>.*`,
# the same layers) are renamed on load by `upgrade_state_dict`.
ARCH_VERSION = 2


@dataclass
class ClassifierConfig:
    in_channels: int = 4           # latent channels
    base_channels: int = 32        # width of the first level
    channel_mults: tuple[int, ...] = (1, 2)  # width multiplier per level; a stride-2 conv between levels
    num_res_blocks: int = 2        # ResBlocks per level
    num_classes: int = 10

    def validate(self):
        if self.in_channels < 1 or self.base_channels < 8 or self.num_res_blocks < 1:
            raise ConfigError("classifier: in_channels >= 1, base_channels >= 8 and num_res_blocks >= 1 are required")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError("classifier.channel_mults must be a non-empty list of positive integers")
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")


class NoisyClassifier(nn.Module):
    """(z_t, t) -> logits (B, K). Knows no schedule: t only enters through its embedding."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch = cfg.base_channels
        emb = 4 * ch
        self.time_mlp = time_mlp(ch, emb)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down, chans = down_path(ch, cfg.channel_mults, cfg.num_res_blocks,
                                     lambda cin, cout, lvl: nn.ModuleList([ResBlock(cin, cout, emb)]))
        cur = chans[-1]
        self.norm_out = group_norm(cur)
        self.head = nn.Linear(cur, cfg.num_classes)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"the classifier expects {self.cfg.in_channels} latent channels, got {x.shape[1]}")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        h = run_down(self.down, self.conv_in(x), emb)[-1]
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool: (B, C, h, w) -> (B, C)
        return self.head(h)


def upgrade_state_dict(sd: dict, net: NoisyClassifier, version: int) -> dict:
    """Parameter names of a file of architecture `version` as `net` names them (same tensors)."""
    if version >= 2:
        return sd
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):  # v1: blocks.<i>.<rest>; ResBlocks are now wrapped as down.<i>.0.<rest>
            _, i, rest = key.split(".", 2)
            key = f"down.{i}.{rest}" if isinstance(net.down[int(i)], Downsample) else f"down.{i}.0.{rest}"
        out[key] = value
    return out


def save_classifier(net: NoisyClassifier, path: str | Path, meta: dict, dtype: torch.dtype = torch.float32):
    """Write the weights (cast to `dtype`) with `meta` in the header, and the header as PATH.json."""
    path = Path(path)
    meta = {"architecture": "NoisyClassifier", "architecture_version": ARCH_VERSION,
            "classifier": dataclasses.asdict(net.cfg), "dtype": str(dtype).replace("torch.", ""), **meta}
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_state(path, sd, meta)
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def load_classifier(path: str | Path, device="cpu") -> tuple[NoisyClassifier, dict]:
    """A classifier written by :func:`save_classifier`, in float32 and eval mode, with its header."""
    tensors, meta = load_state(path)
    if meta.get("architecture") != "NoisyClassifier" or meta.get("architecture_version", 0) > ARCH_VERSION:
        raise ModelError(f"{path} is not a latentdiff noise-aware classifier (or was written by a newer version)")
    try:
        cfg = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["classifier"].items()})
        net = NoisyClassifier(cfg)
        sd = upgrade_state_dict(tensors, net, int(meta.get("architecture_version", 1)))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, ConfigError) as e:
        raise ModelError(f"{path} is invalid: {str(e).splitlines()[0]}") from None
    load_into(net, sd, path, "its own header")
    return net.to(device).eval().requires_grad_(False), meta


def check_compatible(meta: dict, path, *, latent_shape, num_train_steps: int, latent_stats: dict):
    """Refuse a classifier trained for another model's latents, normalisation or noise levels."""
    theirs = (tuple(meta.get("latent_shape", ())), int(meta.get("num_train_steps", -1)))
    if theirs != (tuple(latent_shape), int(num_train_steps)):
        raise ModelError(f"{path} was trained for latents {theirs[0]} and T = {theirs[1]}, but this model has "
                         f"latents {tuple(latent_shape)} and T = {num_train_steps}; train one for it with "
                         "`latentdiff train-classifier`")
    stats = meta.get("latent_stats")
    if stats is None and "scale_factor" in meta:  # written before per-channel statistics: one global scale
        stats = {"shift": [0.0] * latent_shape[0], "scale": [meta["scale_factor"]] * latent_shape[0]}
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == len(latent_stats[k])
        and np.allclose(np.asarray(stats[k], dtype=float), latent_stats[k], rtol=1e-3, atol=1e-6) for k in latent_stats)
    if not ok:
        raise ModelError(f"{path} was trained for another autoencoder (its latent normalisation differs from this "
                         "model's); train one for this model with `latentdiff train-classifier`")