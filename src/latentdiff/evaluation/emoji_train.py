"""Training of the emoji judges (:mod:`latentdiff.evaluation.emoji_nets`) on the emoji training split.

Used by ``scripts/train_emoji_eval_models.py`` (which ships the results in ``assets/``) and by the tests
(in seconds, on a few images). Augmentation: random shifts of up to 3 pixels on a white border, so the
judges do not depend on the exact placement of a generated emoji.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.data.emoji import CATEGORIES, EmojiData
from latentdiff.evaluation.emoji_nets import (
    EMOJI_EVAL_ARCH_VERSION,
    EVAL_SIZE,
    EmojiCLIP,
    EmojiClassifier,
    build_vocab,
    tokenize,
)

log = logging.getLogger(__name__)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 -> float N×3×32×32 in [-1, 1] (area-resized)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != EVAL_SIZE:
        x = F.interpolate(x, size=(EVAL_SIZE, EVAL_SIZE), mode="area" if x.shape[-1] > EVAL_SIZE else "bilinear")
    return x


def shift(x: torch.Tensor, gen: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Each image moved by a random offset in [-pad, pad]² on a white (1.0) border."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _schedule(opt, step: int, total: int, lr: float, warmup: int = 50) -> None:
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    for g in opt.param_groups:
        g["lr"] = lr * f


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)]


@torch.no_grad()
def classifier_accuracy(net: EmojiClassifier, data: EmojiData, subcategories: list[str]) -> dict[str, float]:
    net.eval()
    x = to_input(data.images)
    cat, sub = zip(*(net(x[i:i + 512]) for i in range(0, len(x), 512)))
    cat, sub = torch.cat(cat).argmax(1).numpy(), torch.cat(sub).argmax(1).numpy()
    index = {s: i for i, s in enumerate(subcategories)}
    sub_true = np.array([index.get(s, -1) for s in data.subcategories])
    return {"category_accuracy": float((cat == data.labels).mean()),
            "subcategory_accuracy": float((sub == sub_true).mean())}


def train_emoji_classifier(train: EmojiData, *, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                           seed: int = 0) -> tuple[EmojiClassifier, dict]:
    """A classifier trained for ``steps`` AdamW steps (cosine schedule) on both heads; (net, metadata)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    subcategories = sorted(set(train.subcategories))
    index = {s: i for i, s in enumerate(subcategories)}
    x_all, y_cat = to_input(train.images), torch.from_numpy(train.labels)
    y_sub = torch.tensor([index[s] for s in train.subcategories])
    net = EmojiClassifier(len(CATEGORIES), len(subcategories))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    step, t0 = 0, time.time()
    while step < steps:
        for idx in _batches(len(x_all), min(batch_size, len(x_all)), gen):
            net.train()
            _schedule(opt, step, steps, lr)
            cat, sub = net(shift(x_all[idx], gen))
            loss = F.cross_entropy(cat, y_cat[idx], label_smoothing=0.1) + \
                F.cross_entropy(sub, y_sub[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                log.info("classifier step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), time.time() - t0)
            if step >= steps:
                break
    meta = {"kind": "emoji-classifier", "architecture_version": EMOJI_EVAL_ARCH_VERSION,
            "categories": list(CATEGORIES), "subcategories": subcategories, "steps": steps,
            "batch_size": batch_size, "lr": lr, "seed": seed, "train_images": len(train),
            "train_seconds": round(time.time() - t0, 1)}
    return net.eval(), meta


def train_emoji_clip(train: EmojiData, *, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0) -> tuple[EmojiCLIP, dict]:
    """The contrastive pair trained with symmetric InfoNCE on (image, caption) pairs; (net, metadata)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab = build_vocab(train.captions)
    x_all = to_input(train.images)
    ids_all, mask_all = tokenize(train.captions, vocab)
    net = EmojiCLIP(len(vocab))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    step, t0 = 0, time.time()
    while step < steps:
        for idx in _batches(len(x_all), min(batch_size, len(x_all)), gen):
            net.train()
            _schedule(opt, step, steps, lr)
            length = int(mask_all[idx].sum(1).max())
            loss = net.loss(shift(x_all[idx], gen), ids_all[idx, :length], mask_all[idx, :length])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                log.info("clip step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), time.time() - t0)
            if step >= steps:
                break
    meta = {"kind": "emoji-clip", "architecture_version": EMOJI_EVAL_ARCH_VERSION, "vocab": vocab,
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "train_images": len(train),
            "train_seconds": round(time.time() - t0, 1)}
    return net.eval(), meta
