"""Small networks that judge emoji images: a category/subcategory classifier and an image–text pair.

* :class:`EmojiClassifier`: a CNN on 32×32 RGB with two heads (the 10 emoji categories and the
  subcategories); its 128-d penultimate activations are the features for FD and precision/recall.
* :class:`EmojiCLIP`: an AttnGAN-style contrastive pair (a CNN image encoder and a bidirectional-GRU
  word encoder over the caption's words) trained with the symmetric InfoNCE loss; it ranks captions
  for R-precision. Nothing is downloaded: both are trained on the emoji training split
  (``scripts/train_emoji_eval_models.py``) and shipped in ``assets/``.

Both take images as float N×3×H×W in [-1, 1] and resize them to 32×32 themselves.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

EMOJI_EVAL_ARCH_VERSION = 1  # bump when a layer below changes; the assets' headers record it

EVAL_SIZE = 32

PAD, UNK = 0, 1

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words: ``"waving hand: medium-light skin tone"`` -> waving hand medium light skin tone."""
    return _WORD.findall(text.lower())


def build_vocab(captions, max_size: int = 4096) -> list[str]:
    """The most frequent words of ``captions`` (ties alphabetical) after ``<pad>`` and ``<unk>``."""
    counts: dict[str, int] = {}
    for caption in captions:
        for w in words(caption):
            counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return ["<pad>", "<unk>"] + ranked[:max_size - 2]


def tokenize(captions, vocab: list[str], max_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids (int64 N×L, PAD-padded, unknown words UNK) and the mask of real tokens (bool N×L)."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = [[index.get(w, UNK) for w in words(c)][:max_len] or [UNK] for c in captions]
    length = max(len(t) for t in ids)
    out = torch.full((len(ids), length), PAD, dtype=torch.long)
    for i, t in enumerate(ids):
        out[i, :len(t)] = torch.tensor(t)
    return out, out != PAD


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]


class ImageEncoder(nn.Module):
    """32×32 RGB -> ``dim``-d: 4 conv blocks (BatchNorm + SiLU; 16, 32, 64, 128 channels) with 2×2 max-pool
    between them, global mean, linear. Small (≈0.1 M parameters) so that it trains in minutes on a busy CPU."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(*_block(3, 16), nn.MaxPool2d(2), *_block(16, 32), nn.MaxPool2d(2),
                                  *_block(32, 64), nn.MaxPool2d(2), *_block(64, 128), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.proj = nn.Linear(128, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != EVAL_SIZE or x.shape[-2] != EVAL_SIZE:
            x = F.interpolate(x, size=(EVAL_SIZE, EVAL_SIZE), mode="area" if x.shape[-1] > EVAL_SIZE
                              else "bilinear")
        return self.proj(self.body(x))


class EmojiClassifier(nn.Module):
    """Image encoder -> 128-d features (BatchNorm + SiLU) -> category and subcategory logits."""

    def __init__(self, num_categories: int, num_subcategories: int, feature_dim: int = 128):
        super().__init__()
        self.encoder = ImageEncoder(feature_dim)
        self.norm = nn.BatchNorm1d(feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.category_head = nn.Linear(feature_dim, num_categories)
        self.subcategory_head = nn.Linear(feature_dim, num_subcategories)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(self.features(x))
        return self.category_head(h), self.subcategory_head(h)


class TextEncoder(nn.Module):
    """Word embeddings -> bidirectional GRU -> mean over the real tokens -> ``dim``-d."""

    def __init__(self, vocab_size: int, dim: int = 128, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        m = mask.unsqueeze(-1).to(out.dtype)
        return self.proj((out * m).sum(1) / m.sum(1).clamp(min=1))


class EmojiCLIP(nn.Module):
    """Image and caption embeddings on the unit sphere; similarity = cosine × a learned scale."""

    def __init__(self, vocab_size: int, dim: int = 128):
        super().__init__()
        self.image = ImageEncoder(dim)
        self.text = TextEncoder(vocab_size, dim)
        self.log_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP starts

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask), dim=-1)

    def loss(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE: image i's caption is caption i, and every other caption of the batch is a negative
        (captions identical to caption i are not counted as negatives)."""
        img, txt = self.embed_images(x), self.embed_text(ids, mask)
        logits = self.log_scale.clamp(max=4.6052).exp() * img @ txt.T  # scale at most 100
        same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)  # N×N: identical token sequences
        logits = logits.masked_fill(same & ~torch.eye(len(x), dtype=torch.bool, device=x.device), float("-inf"))
        target = torch.arange(len(x), device=x.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
