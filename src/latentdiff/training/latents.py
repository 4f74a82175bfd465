"""The latents that stage 2 (and the noisy classifier) train on: the codec's posterior q(z | x) of every
training image, with each caption's text encoding, drawn by global batch index.

Two stores with one interface (``len``, ``draw(idx, gen)``):

- :class:`Posteriors`: everything encoded once into memory (on the training device);
- :class:`CachedLatents`: the sharded latent cache (:mod:`latentdiff.data.latent_cache`) on disk, built
  once by streaming the data set through the codec and the text encoder (in parallel under torchrun) and
  read back by memory-mapped random access, so a data set larger than memory trains. The loop's batches,
  noise and resume are unchanged: with float32 latents, training from the cache gives the same numbers
  as training from memory (text states are stored as float16).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from latentdiff.codecs.autoencoder import Autoencoder, DiagonalGaussian
from latentdiff.data.datasets import item_dataset
from latentdiff.data.latent_cache import LatentCache, build_latent_cache, codec_encoder
from latentdiff.pipeline.config import Config
from latentdiff.utils.state import state_digest

log = logging.getLogger(__name__)

Text = tuple[torch.Tensor, torch.Tensor]  # (context or token ids (B, L, ...), padding mask (B, L))


class Posteriors:
    """The codec's posterior q(z | x) of every image, computed once, on the device, with the codec that
    normalises samples of it (the codec owns the normalisation; nothing here knows its constants), and
    optionally every caption's (context, mask)."""

    def __init__(self, codec: Autoencoder, post: DiagonalGaussian, text: Text | None = None):
        self.codec, self.post, self.text = codec, post, text

    @property
    def mean(self) -> torch.Tensor:
        return self.post.mean

    def __len__(self) -> int:
        return len(self.post.mean)

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, Text | None]:
        """A fresh normalised latent sample of items `idx` (ε from `gen`) and their text."""
        idx = idx.to(self.mean.device)
        text = (self.text[0][idx], self.text[1][idx]) if self.text is not None else None
        return sample_posterior(self, idx, gen), text


def encode_dataset(ae: Autoencoder, images: np.ndarray, device, batch_size: int = 500) -> Posteriors:
    """Posterior of every uint8 image (N, H, W, C), in batches of `batch_size`."""
    return Posteriors(ae, ae.encode_dataset(images, batch_size, device))


def sample_posterior(post: Posteriors, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A fresh normalised sample of the cached posteriors of items `idx` (ε drawn from `gen`)."""
    q = DiagonalGaussian(post.post.mean[idx], post.post.logvar[idx])
    noise = torch.randn(q.mean.shape, generator=gen, device=q.mean.device)
    return post.codec.sample_latent(q, noise=noise)


def posterior_means(post: Posteriors) -> torch.Tensor:
    """The normalised posterior means (a deterministic encoding, for evaluation)."""
    return post.codec.normalize(post.post.mean)


class CachedLatents:
    """Posteriors (mean, std) and text encodings read from a finished latent cache, batch by batch."""

    def __init__(self, codec: Autoencoder, cache: LatentCache, device: torch.device):
        self.codec, self.cache, self.device = codec, cache, device

    def __len__(self) -> int:
        return len(self.cache)

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, Text | None]:
        rows = self.cache.rows(idx.cpu().numpy())
        mean, std = rows["mean"].to(self.device), rows["std"].to(self.device)
        noise = torch.randn(mean.shape, generator=gen, device=self.device)
        text = (rows["text"].to(self.device), rows["text_mask"].to(self.device)) if "text" in rows else None
        return self.codec.normalize(mean + std * noise), text


def cache_folder(cfg: Config, run_dir: Path) -> Path:
    """Where data.latent_cache puts the cache: RUN_DIR/latent-cache for "auto", else the folder given."""
    return run_dir / "latent-cache" if cfg.data.latent_cache == "auto" else Path(cfg.data.latent_cache).expanduser()


def training_items(cfg: Config, ae: Autoencoder):
    """The training data as items for the cache (``.info`` describes it): a captioned folder streams; other
    sources are loaded into memory (their latents still go to the cache). Its images take the codec's size
    when data.image_size is not set."""
    d = cfg.data
    size = d.image_size or (ae.image_size[0] if ae.image_size[0] == ae.image_size[1] else None)
    return item_dataset(d.source, "train", data_dir=d.data_dir, image_size=size, channels=ae.cfg.image_channels,
                        limit=d.limit)


def cached_latents(cfg: Config, ae: Autoencoder, items, encode_text, run_dir: Path,
                   device: torch.device) -> CachedLatents:
    """Build (or resume, or reuse) the latent cache of `items` and open it. Images stream through a
    DataLoader with data.workers workers; every rank of a torchrun job encodes its share of the shards.
    `encode_text`: captions -> (context, mask), or None for a model without text."""
    d = cfg.data
    fingerprint = {"codec": state_digest(ae.state_dict()), "text": vars(cfg.text) if encode_text else None,
                   "source": str(d.source), "image_size": list(items.info.image_size), "channels": items.info.channels,
                   "limit": d.limit}
    folder = cache_folder(cfg, run_dir)
    t0 = time.perf_counter()

    def progress(done: int, total: int):
        log.info(f"latent cache: {done}/{total} items of this process encoded ({time.perf_counter() - t0:.0f} s)")

    cache = build_latent_cache(items, folder, encode_images=codec_encoder(ae), encode_text=encode_text,
                               fingerprint=fingerprint, shard_size=d.cache_shard_size, num_workers=d.workers,
                               progress=progress)
    log.info(f"latent cache {folder}: {len(cache)} items in {len(cache.counts)} shards")
    return CachedLatents(ae, cache, device)
