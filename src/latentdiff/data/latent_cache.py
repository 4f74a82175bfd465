"""A sharded cache of latents and text encodings, built once and read shard by shard.

:func:`build_latent_cache` runs a data set (items ``{"image", "text", "index"}``, e.g.
:class:`~latentdiff.data.captioned.CaptionedImages`) through ``encode_images`` (images -> posterior
mean and std, e.g. :func:`codec_encoder` of the autoencoder) and ``encode_text`` (captions -> (tokens
or states, mask), whatever the text encoder returns) and writes ``shard-NNNNN.safetensors`` files of
``shard_size`` items plus ``index.json`` (SHA-256 of every shard, the build's fingerprint). The index
is rewritten after every shard, so an interrupted build resumes at the first missing shard; a cache
built with another fingerprint is refused.

:class:`LatentShards` streams a finished cache, one shard in memory at a time, so a data set larger than
memory trains. Each epoch shuffles the shard order and the rows within each shard. Ranks of a
distributed run take every world_size-th item of that order: their sets are disjoint, and together they
cover everything. As with DistributedSampler, the first items are repeated so that every rank gets the
same count. DataLoader workers split a rank's items by shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from latentdiff.data.captioned import dist_info
from latentdiff.errors import DataError
from latentdiff.utils.files import atomic_path, sha256_file, write_text_atomic

INDEX = "index.json"

CACHE_VERSION = 1


def codec_encoder(autoencoder) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``encode_images`` for an autoencoder whose ``encode(x)`` returns a posterior with ``mean`` and ``std``."""
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = autoencoder.encode(x)
        return post.mean, post.std
    return encode


def _read_index(directory: Path) -> dict | None:
    path = directory / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"latent cache index {path} is unreadable ({e}); delete {directory} and rebuild") from e
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION or not isinstance(index.get("shards"), list):
        raise DataError(f"{path} is not a version-{CACHE_VERSION} latent cache index; delete it and rebuild")
    return index


def _write_shard(path: Path, parts: dict[str, list], captions: list[str], text_dtype) -> None:
    tensors = {"mean": torch.cat(parts["mean"]), "std": torch.cat(parts["std"]),
               "index": torch.cat(parts["index"])}
    if parts["text"]:
        length = max(t.shape[1] for t in parts["text"])
        pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))  # noqa: E731
        text = torch.cat([pad(t) for t in parts["text"]])
        tensors["text"] = text.to(text_dtype) if text.is_floating_point() else text
        tensors["text_mask"] = torch.cat([pad(m.to(torch.uint8).unsqueeze(-1)).squeeze(-1)
                                         for m in parts["text_mask"]]).bool()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"captions": json.dumps(captions, ensure_ascii=False)})


@torch.no_grad()
def build_latent_cache(dataset: Dataset, directory: str | os.PathLike, *,
                       encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                       fingerprint: dict | None = None, shard_size: int = 1024, batch_size: int = 64,
                       num_workers: int = 0, latent_dtype=torch.float32, text_dtype=torch.float16,
                       progress: Callable[[int, int], None] | None = None) -> LatentCache:
    """Encode ``dataset`` into shards under ``directory`` (resuming a partial build); returns the cache.

    ``fingerprint`` (JSON-able: codec and text-encoder identity, data source, image size) must match the
    one of a partial or finished cache in ``directory``.
    """
    if shard_size < 1 or batch_size < 1:
        raise DataError(f"shard_size and batch_size must be ≥ 1, got {shard_size} and {batch_size}")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = {"count": len(dataset), "shard_size": shard_size, **(fingerprint or {})}
    index = _read_index(directory) or {"version": CACHE_VERSION, "fingerprint": fingerprint, "shards": [],
                                       "complete": False}
    if index["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise DataError(f"latent cache {directory} was built with {index['fingerprint']}, not {fingerprint}; "
                        "use another folder or delete it")
    for shard in index["shards"]:  # a resumed build trusts only shards that still hash right
        if sha256_file(directory / shard["file"]) != shard["sha256"]:
            raise DataError(f"latent cache shard {directory / shard['file']} is corrupt; delete {directory}")
    done = len(index["shards"])
    start = done * shard_size
    loader = DataLoader(Subset(dataset, range(start, len(dataset))), batch_size=min(batch_size, shard_size),
                        shuffle=False, num_workers=num_workers)
    parts: dict[str, list] = {"mean": [], "std": [], "index": [], "text": [], "text_mask": []}
    captions: list[str] = []
    for batch in loader:
        mean, std = encode_images(batch["image"])
        parts["mean"].append(mean.to(latent_dtype).cpu())
        parts["std"].append(std.to(latent_dtype).cpu())
        parts["index"].append(torch.as_tensor(batch["index"], dtype=torch.long))
        if encode_text is not None:
            text, mask = encode_text(list(batch["text"]))
            parts["text"].append(text.cpu())
            parts["text_mask"].append(mask.cpu().bool())
        captions += list(batch["text"])
        if len(captions) >= shard_size or start + len(captions) == len(dataset):
            _flush(directory, index, parts, captions, text_dtype)
            start += len(captions)
            parts = {k: [] for k in parts}
            captions = []
            if progress is not None:
                progress(start, len(dataset))
    index["complete"] = True
    write_text_atomic(directory / INDEX, json.dumps(index, indent=1))
    return LatentCache(directory)


def _flush(directory: Path, index: dict, parts: dict, captions: list[str], text_dtype) -> None:
    name = f"shard-{len(index['shards']):05d}.safetensors"
    _write_shard(directory / name, parts, captions, text_dtype)
    index["shards"].append({"file": name, "count": len(captions), "sha256": sha256_file(directory / name)})
    write_text_atomic(directory / INDEX, json.dumps(index, indent=1))


class LatentCache:
    """A finished cache: its index, and its shards read one at a time (each checked against its SHA-256)."""

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True):
        self.directory = Path(directory).expanduser()
        index = _read_index(self.directory)
        if index is None or not index.get("complete"):
            raise DataError(f"{self.directory} holds no finished latent cache; build it with build_latent_cache")
        self.index, self.verify = index, verify
        self.counts = [int(s["count"]) for s in index["shards"]]

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def shard(self, i: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Shard i's tensors (mean, std, index[, text, text_mask]) and captions."""
        entry = self.index["shards"][i]
        path = self.directory / entry["file"]
        if self.verify and (not path.is_file() or sha256_file(path) != entry["sha256"]):
            raise DataError(f"latent cache shard {path} is missing or corrupt; rebuild the cache")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            captions = json.loads((f.metadata() or {}).get("captions", "[]"))
        return tensors, captions


class LatentShards(IterableDataset):
    """Items ``{"latent", "text"?, "text_mask"?, "caption", "index"}`` of a cache, streamed shard by shard.

    ``sample``: draw latent = mean + std·ε (seeded by seed, epoch and the item's index), else the mean.
    """

    def __init__(self, cache: LatentCache, *, shuffle: bool = True, seed: int = 0, sample: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.cache, self.shuffle, self.seed, self.sample = cache, shuffle, seed, sample
        self.rank, self.world_size = dist_info(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This rank's (shard, row) pairs for the current epoch, shard-contiguous: int64 M×2."""
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = rng.permutation(len(self.cache.counts)) if self.shuffle else np.arange(len(self.cache.counts))
        pairs = [np.stack([np.full(self.cache.counts[s], s), rng.permutation(self.cache.counts[s])
                           if self.shuffle else np.arange(self.cache.counts[s])], 1) for s in shards]
        order = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
        per_rank = -(-len(order) // self.world_size)
        padded = np.concatenate([order, order[:per_rank * self.world_size - len(order)]])
        return padded[self.rank::self.world_size]

    def __len__(self) -> int:
        return -(-len(self.cache) // self.world_size)

    def __iter__(self):
        order = self.order()
        info = get_worker_info()
        runs = np.split(order, np.flatnonzero(np.diff(order[:, 0])) + 1) if len(order) else []
        if info is not None:
            runs = runs[info.id::info.num_workers]
        for run in runs:
            tensors, captions = self.cache.shard(int(run[0, 0]))
            for row in run[:, 1]:
                yield self._item(tensors, captions, int(row))

    def _item(self, tensors: dict, captions: list[str], row: int) -> dict:
        index = int(tensors["index"][row])
        mean, std = tensors["mean"][row].float(), tensors["std"][row].float()
        if self.sample:
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            mean = mean + std * torch.randn(mean.shape, generator=gen)
        item = {"latent": mean, "caption": captions[row], "index": index}
        if "text" in tensors:
            item["text"], item["text_mask"] = tensors["text"][row], tensors["text_mask"][row]
        return item


def collate_latents(items: list[dict]) -> dict:
    """Stack a batch; text tokens/states and masks are padded to the batch's longest text."""
    out = {"latent": torch.stack([i["latent"] for i in items]), "caption": [i["caption"] for i in items],
           "index": torch.tensor([i["index"] for i in items])}
    if "text" in items[0]:  # each item is padded to its shard's width: trim to the batch's last real token
        ends = [int(i["text_mask"].nonzero().max()) + 1 if i["text_mask"].any() else 1 for i in items]
        text = items[0]["text"]
        out["text"] = torch.zeros((len(items), max(ends), *text.shape[1:]), dtype=text.dtype)
        out["text_mask"] = torch.zeros((len(items), max(ends)), dtype=torch.bool)
        for j, (i, n) in enumerate(zip(items, ends)):
            out["text"][j, :n], out["text_mask"][j, :n] = i["text"][:n], i["text_mask"][:n]
    return out


def latent_loader(cache: LatentCache | str | os.PathLike, batch_size: int, *, num_workers: int = 0,
                  **options) -> DataLoader:
    """A DataLoader of batches from a cache (``options`` go to :class:`LatentShards`)."""
    if not isinstance(cache, LatentCache):
        cache = LatentCache(cache)
    return DataLoader(LatentShards(cache, **options), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_latents)
