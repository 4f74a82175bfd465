"""A sharded cache of latents and text encodings, built once, then read by index or shard by shard.

:func:`build_latent_cache` runs a data set (items ``{"image", "text", "index"}``, e.g.
:class:`~latentdiff.data.captioned.CaptionedImages`) through ``encode_images`` (images -> posterior
mean and std, e.g. :func:`codec_encoder` of the autoencoder) and ``encode_text`` (captions -> (tokens
or states, mask), whatever the text encoder returns) and writes ``shard-NNNNN.safetensors`` files of
``shard_size`` consecutive items. Each shard gets a record ``shard-NNNNN.json`` (count, SHA-256, the
build's fingerprint) once it is complete, so an interrupted build resumes at the missing shards, and a
cache built with another fingerprint is refused. Under torchrun every rank encodes every world_size-th
shard; rank 0 then writes ``index.json``, which marks the cache finished.

Two readers:

- :meth:`LatentCache.rows` gathers items by data-set index from memory-mapped shards (the training
  loop's random batches; the operating system pages shards in and out, so a cache larger than memory
  trains, and only the rows read are copied);
- :class:`LatentShards` streams the cache one shard at a time through a DataLoader. Each epoch shuffles
  the shard order and the rows within each shard. Ranks of a distributed run take every world_size-th
  item of that order: their sets are disjoint, and together they cover everything. As with
  DistributedSampler, the first items are repeated so that every rank gets the same count. DataLoader
  workers split a rank's items by shard.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from latentdiff.data.captioned import dist_info
from latentdiff.errors import DataError
from latentdiff.utils.files import atomic_path, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"

CACHE_VERSION = 2

# safetensors dtype names -> numpy (the dtypes a cache holds; bfloat16 has no numpy type and is refused)
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                 "U8": np.uint8, "BOOL": np.bool_}
_TEXT_DTYPES = (torch.float16, torch.float32)


def codec_encoder(autoencoder) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``encode_images`` for an autoencoder whose ``encode(x)`` returns a posterior with ``mean`` and ``std``."""
    device = next(autoencoder.parameters()).device

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = autoencoder.encode(x.to(device))
        return post.mean, post.std
    return encode


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is unreadable ({e}); delete {path.parent} and rebuild") from e
    if not isinstance(value, dict):
        raise DataError(f"{what} {path} is not a JSON object; delete {path.parent} and rebuild")
    return value


def _read_index(directory: Path) -> dict | None:
    index = _read_json(directory / INDEX, "latent cache index")
    if index is not None and (index.get("version") != CACHE_VERSION or not isinstance(index.get("shards"), list)):
        raise DataError(f"{directory / INDEX} is not a version-{CACHE_VERSION} latent cache index; "
                        f"delete {directory} and rebuild")
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


def _shard_done(directory: Path, i: int, fingerprint: dict) -> bool:
    """Whether shard i is complete and intact (a record whose hash matches); a record of another
    fingerprint is an error (the folder holds another build)."""
    record = _read_json(directory / shard_name(i).replace(".safetensors", ".json"), "latent cache shard record")
    if record is None:
        return False
    if record.get("fingerprint") != fingerprint:
        raise DataError(f"latent cache {directory} was built with {record.get('fingerprint')}, not {fingerprint}; "
                        "use another folder or delete it")
    path = directory / shard_name(i)
    if path.is_file() and sha256_file(path) == record.get("sha256"):
        return True
    log.warning(f"latent cache shard {path} is missing or corrupt: encoding it again")
    return False


@torch.no_grad()
def build_latent_cache(dataset: Dataset, directory: str | os.PathLike, *,
                       encode_images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                       fingerprint: dict | None = None, shard_size: int = 1024, batch_size: int = 64,
                       num_workers: int = 0, latent_dtype=torch.float32, text_dtype=torch.float16,
                       progress: Callable[[int, int], None] | None = None, rank: int | None = None,
                       world_size: int | None = None) -> LatentCache | None:
    """Encode ``dataset`` into shards under ``directory`` (resuming a partial build); returns the cache.

    ``fingerprint`` (JSON-able: codec and text-encoder identity, data source, image size) must match the
    one of a partial or finished cache in ``directory``. With several ranks (see
    :func:`~latentdiff.data.captioned.dist_info`) each encodes its share of the shards; under an initialised
    torch.distributed group they then wait for each other and every rank gets the cache. Without one
    (explicit ``rank``/``world_size``) this returns None and :func:`finish_latent_cache` completes the
    cache once every rank is done.
    """
    if shard_size < 1 or batch_size < 1:
        raise DataError(f"shard_size and batch_size must be ≥ 1, got {shard_size} and {batch_size}")
    if text_dtype not in _TEXT_DTYPES:
        raise DataError(f"text_dtype must be torch.float16 or torch.float32, got {text_dtype}")
    rank, world_size = dist_info(rank, world_size)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = json.loads(json.dumps({"count": len(dataset), "shard_size": shard_size, **(fingerprint or {})}))
    index = _read_index(directory)
    if index is not None:
        if index.get("fingerprint") != fingerprint:
            raise DataError(f"latent cache {directory} was built with {index.get('fingerprint')}, not "
                            f"{fingerprint}; use another folder or delete it")
        if index.get("complete"):
            return LatentCache(directory)
    n_shards = -(-len(dataset) // shard_size)
    todo = [i for i in range(rank, n_shards, world_size) if not _shard_done(directory, i, fingerprint)]
    _encode_shards(dataset, directory, todo, fingerprint, encode_images, encode_text, batch_size, num_workers,
                   latent_dtype, text_dtype, progress)
    if world_size == 1:
        return finish_latent_cache(directory)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    torch.distributed.barrier()
    if rank == 0:
        finish_latent_cache(directory)
    torch.distributed.barrier()
    return LatentCache(directory)


def _encode_shards(dataset, directory: Path, todo: list[int], fingerprint: dict, encode_images, encode_text,
                   batch_size: int, num_workers: int, latent_dtype, text_dtype, progress) -> None:
    """Encode the shards `todo`, each from consecutive items, in batches that never cross a shard."""
    size, total = fingerprint["shard_size"], len(dataset)
    ranges = {i: range(i * size, min((i + 1) * size, total)) for i in todo}
    batches = [list(r[j:j + batch_size]) for r in ranges.values() for j in range(0, len(r), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    shard_of = iter([i for i, r in ranges.items() for _ in range(0, len(r), batch_size)])
    parts: dict[str, list] = {"mean": [], "std": [], "index": [], "text": [], "text_mask": []}
    captions: list[str] = []
    done = 0
    for batch, i in zip(loader, shard_of):
        mean, std = encode_images(batch["image"])
        parts["mean"].append(mean.to(latent_dtype).cpu())
        parts["std"].append(std.to(latent_dtype).cpu())
        parts["index"].append(torch.as_tensor(batch["index"], dtype=torch.long))
        if encode_text is not None:
            text, mask = encode_text(list(batch["text"]))
            parts["text"].append(text.cpu())
            parts["text_mask"].append(mask.cpu().bool())
        captions += list(batch["text"])
        if len(captions) == len(ranges[i]):  # shard i is complete: write it, then its record
            path = directory / shard_name(i)
            _write_shard(path, parts, captions, text_dtype)
            record = {"count": len(captions), "sha256": sha256_file(path), "fingerprint": fingerprint}
            write_text_atomic(path.with_suffix(".json"), json.dumps(record))
            done += len(captions)
            parts, captions = {k: [] for k in parts}, []
            if progress is not None:
                progress(done, sum(map(len, ranges.values())))


def finish_latent_cache(directory: str | os.PathLike) -> LatentCache:
    """Write ``index.json`` from the shard records once every shard is built; returns the cache."""
    directory = Path(directory).expanduser()
    names = sorted(p.name for p in directory.glob("shard-*.json"))
    if not names:
        raise DataError(f"{directory} holds no latent cache shards; build it with build_latent_cache")
    fingerprint = _read_json(directory / names[0], "latent cache shard record").get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise DataError(f"{directory / names[0]} has no fingerprint; delete {directory} and rebuild")
    expected = -(-fingerprint["count"] // fingerprint["shard_size"])
    records = [_read_json(directory / shard_name(i).replace(".safetensors", ".json"), "latent cache shard record")
               for i in range(expected)]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing or any(r["fingerprint"] != fingerprint for r in records):
        raise DataError(f"latent cache {directory} has {expected - len(missing)} of {expected} shards of one build "
                        f"(missing: {', '.join(map(str, missing[:5]))}{'…' if len(missing) > 5 else ''}): "
                        "finish the build on every rank first")
    records = [{"file": shard_name(i), **r} for i, r in enumerate(records)]
    index = {"version": CACHE_VERSION, "fingerprint": fingerprint, "complete": True,
             "shards": [{k: r[k] for k in ("file", "count", "sha256")} for r in records]}
    write_text_atomic(directory / INDEX, json.dumps(index, indent=1))
    return LatentCache(directory)


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only numpy views of every tensor of a safetensors file, memory-mapped (nothing is read until
    used). The format: an 8-byte little-endian header length, a JSON header of dtype, shape and byte
    offsets into the data that follows."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if len(mm) < 8:
        raise DataError(f"latent cache shard {path} is truncated; rebuild the cache")
    (n,) = struct.unpack("<Q", mm[:8].tobytes())
    try:
        header = json.loads(mm[8:8 + n].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"latent cache shard {path} has a bad header ({e}); rebuild the cache") from None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        out[name] = mm[8 + n + begin:8 + n + end].view(dtype).reshape(entry["shape"])
    return out


class LatentCache:
    """A finished cache: its index, its shards read whole (:meth:`shard`) or row by row (:meth:`rows`); each
    shard is checked against its SHA-256 the first time this process reads it (``verify``)."""

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True, open_shards: int = 64):
        self.directory = Path(directory).expanduser()
        index = _read_index(self.directory)
        if index is None or not index.get("complete"):
            raise DataError(f"{self.directory} holds no finished latent cache; build it with build_latent_cache")
        self.index, self.verify = index, verify
        self.counts = [int(s["count"]) for s in index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._verified: set[int] = set()
        self._mapped: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._open_shards = open_shards

    def __len__(self) -> int:
        return sum(self.counts)

    def __getstate__(self):  # DataLoader workers map their own shards
        return {**self.__dict__, "_mapped": OrderedDict()}

    @property
    def fingerprint(self) -> dict:
        return self.index["fingerprint"]

    def _path(self, i: int) -> Path:
        entry = self.index["shards"][i]
        path = self.directory / entry["file"]
        if self.verify and i not in self._verified:
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise DataError(f"latent cache shard {path} is missing or corrupt; rebuild the cache")
            self._verified.add(i)
        return path

    def shard(self, i: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Shard i's tensors (mean, std, index[, text, text_mask]) and captions."""
        with safe_open(str(self._path(i)), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            captions = json.loads((f.metadata() or {}).get("captions", "[]"))
        return tensors, captions

    def _mapped_shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._mapped:
            self._mapped.move_to_end(i)
            return self._mapped[i]
        arrays = _map_safetensors(self._path(i))
        if not np.array_equal(arrays["index"], np.arange(self.starts[i], self.starts[i + 1])):
            raise DataError(f"latent cache shard {self.index['shards'][i]['file']} does not hold items "
                            f"{self.starts[i]}…{self.starts[i + 1] - 1} in order; rebuild the cache")
        self._mapped[i] = arrays
        if len(self._mapped) > self._open_shards:  # bound the open files and mappings
            self._mapped.popitem(last=False)
        return arrays

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """Items by data-set index, stacked: ``mean``, ``std`` (float32) and, when the cache has text,
        ``text`` (float32 states or integer tokens) and ``text_mask``, trimmed to the longest text."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise DataError(f"latent cache index out of range 0…{len(self) - 1}")
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for s in np.unique(shards):  # shard by shard, each row put back at its place in the request
            arrays, picked = self._mapped_shard(int(s)), np.flatnonzero(shards == s)
            local = indices[picked] - self.starts[s]
            for name in ("mean", "std", "text", "text_mask"):
                if name in arrays:
                    pieces.setdefault(name, []).append((picked, arrays[name][local]))
        out = {name: torch.from_numpy(_place(parts, len(indices))) for name, parts in pieces.items()}
        for name in ("mean", "std", "text"):
            if name in out and out[name].is_floating_point():
                out[name] = out[name].float()
        if "text_mask" in out:  # trim to the batch's last real token
            real = out["text_mask"].any(0)
            end = int(real.nonzero().max()) + 1 if real.any() else 1
            out["text"], out["text_mask"] = out["text"][:, :end], out["text_mask"][:, :end]
        return out


def _place(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """One array of n rows from (row positions, values) pieces. Text widths differ between shards, so rows
    are zero-padded along axis 1 to the widest (the mask is False there); latents all have one shape."""
    first = parts[0][1]
    shape = (n, max(p.shape[1] for _, p in parts), *first.shape[2:]) if first.ndim >= 2 else (n,)
    full = np.zeros(shape, first.dtype)
    for picked, values in parts:
        full[(picked, slice(0, values.shape[1])) if values.ndim >= 2 else picked] = values
    return full


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
