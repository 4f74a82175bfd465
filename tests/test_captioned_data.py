"""Captioned image folders (metadata.jsonl), their DataLoader and DistributedSampler, the sharded latent cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.captioned import CaptionedImages, caption_loader, read_captions
from latentdiff.data.latent_cache import (
    LatentCache,
    LatentShards,
    build_latent_cache,
    collate_latents,
    latent_loader,
)
from latentdiff.errors import DataError


def _folder(tmp_path, n=8):
    """n images of varied size and mode; image i is filled with grey level 20·i (image 0 transparent)."""
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    lines = []
    for i in range(n):
        v = 20 * i
        if i % 3 == 0:
            im = Image.new("RGBA", (20 + i, 16), (v, v, v, 0 if i == 0 else 255))  # image 0 transparent
        elif i % 3 == 1:
            im = Image.new("L", (16, 24), v)
        else:
            im = Image.new("RGB", (32, 32), (v, v, v))
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        im.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": "word " * (i % 4 + 1) + f"number {i}", "extra": i}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_captioned_folder_items_any_size_and_mode(tmp_path):
    ds = CaptionedImages(_folder(tmp_path), 16)
    assert len(ds) == 8 and ds.records[3]["extra"] == 3
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["text"] == "word word word word number 3"
    assert torch.allclose(item["image"][:, 8, 8], torch.full((3,), 60 / 127.5 - 1))
    assert (ds.image(0) == 255).all()  # a transparent black image composites to white
    gray = ds.image(4)
    assert gray.shape == (16, 16, 3) and (gray == 80).all()


@pytest.mark.parametrize("line, needle", [
    ('{"file_name": "../x.png", "text": "a"}', "outside"),
    ('{"file_name": "nope.png", "text": "a"}', "existing"),
    ('{"file_name": "img0.png"}', "string text"),
    ('{"file_name": "img0.png", "text": "a"', "not JSON"),
])
def test_bad_metadata_is_one_clear_error(tmp_path, line, needle):
    root = _folder(tmp_path, 1)
    (tmp_path / "x.png").write_bytes((root / "img0.png").read_bytes())
    (root / "metadata.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=needle):
        read_captions(root)
    (root / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="no metadata.jsonl"):
        read_captions(root)


def test_loader_with_workers_and_distributed_sampler(tmp_path):
    ds = CaptionedImages(_folder(tmp_path, 7), 8)
    seen = [i for b in caption_loader(ds, 3, num_workers=2, rank=0, world_size=1) for i in b["index"].tolist()]
    assert sorted(seen) == list(range(7))
    ranks = [[i for b in caption_loader(ds, 2, rank=r, world_size=2, seed=1) for i in b["index"].tolist()]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 7 items: one repeated so both ranks take 4 steps
    assert set(ranks[0]) | set(ranks[1]) == set(range(7))
    assert len(set(ranks[0]) & set(ranks[1])) == 1
    with pytest.raises(DataError, match="rank"):
        caption_loader(ds, 2, rank=2, world_size=2)


class _Encoders:
    """Deterministic stand-ins: latent mean = 4×4 average pool, std = 0.1; text = word ids (variable length)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def images(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        mean = torch.nn.functional.avg_pool2d(x, 4)
        return mean, torch.full_like(mean, 0.1)

    @staticmethod
    def text(captions):
        ids = [[len(w) for w in c.split()] for c in captions]
        length = max(map(len, ids))
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for i, t in enumerate(ids):
            out[i, :len(t)] = torch.tensor(t)
        return out, out != 0


def test_latent_cache_round_trip_resume_and_checks(tmp_path):
    ds = CaptionedImages(_folder(tmp_path), 8)
    enc = _Encoders(fail_after=2)
    with pytest.raises(KeyboardInterrupt):  # interrupted after two shards of 3
        build_latent_cache(ds, tmp_path / "c", encode_images=enc.images, encode_text=enc.text, shard_size=3,
                           batch_size=3, fingerprint={"codec": "pool4"})
    assert not (tmp_path / "c" / "index.json").exists()  # unfinished
    records = sorted(p.name for p in (tmp_path / "c").glob("shard-*.json"))
    assert records == ["shard-00000.json", "shard-00001.json"]
    enc2 = _Encoders()
    cache = build_latent_cache(ds, tmp_path / "c", encode_images=enc2.images, encode_text=enc2.text,
                               shard_size=3, batch_size=3, fingerprint={"codec": "pool4"})
    assert enc2.calls == 1 and len(cache) == 8 and cache.counts == [3, 3, 2]  # only the missing shard
    items = {i["index"]: i for i in LatentShards(cache, shuffle=False, sample=False)}
    for k in range(8):
        want = torch.nn.functional.avg_pool2d(ds[k]["image"][None], 4)[0]
        assert torch.allclose(items[k]["latent"], want)
        ids, mask = enc2.text([ds.records[k]["text"]])
        n = int(mask.sum())
        assert items[k]["caption"] == ds.records[k]["text"]
        assert items[k]["text_mask"].sum() == n and torch.equal(items[k]["text"][:n], ids[0, :n])
    with pytest.raises(DataError, match="built with"):
        build_latent_cache(ds, tmp_path / "c", encode_images=enc2.images, shard_size=3, fingerprint={"codec": "x"})
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt"):
        list(LatentShards(LatentCache(tmp_path / "c"), shuffle=False))


@pytest.fixture(scope="module")
def cache7(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c7")
    enc = _Encoders()
    return build_latent_cache(CaptionedImages(_folder(tmp, 7), 8), tmp / "c", encode_images=enc.images,
                              encode_text=enc.text, shard_size=2)


def test_latent_shards_split_across_ranks_and_workers(cache7, monkeypatch):
    reads = []
    original = LatentCache.shard
    monkeypatch.setattr(LatentCache, "shard", lambda self, i: reads.append(i) or original(self, i))
    per_rank = []
    for r in range(2):
        shards = LatentShards(cache7, seed=3, rank=r, world_size=2)
        shards.set_epoch(1)
        per_rank.append([i["index"] for i in shards])
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(7)) and len(set(per_rank[0]) & set(per_rank[1])) == 1
    assert len(reads) <= 2 * (4 + 1)  # shard by shard (+1 for the wrapped padding), never item by item
    one = LatentShards(cache7, seed=3)
    orders = [one.order()[:, 0].tolist()]
    one.set_epoch(1)
    orders.append(one.order()[:, 0].tolist())
    assert orders[0] != orders[1]  # reshuffled each epoch
    batches = list(latent_loader(cache7, 3, num_workers=2, seed=0))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(7))


def test_sampled_latents_and_collate(cache7):
    mean = {i["index"]: i["latent"] for i in LatentShards(cache7, sample=False)}
    a = {i["index"]: i["latent"] for i in LatentShards(cache7, seed=5)}
    b = {i["index"]: i["latent"] for i in LatentShards(cache7, seed=5)}
    eps = (a[2] - mean[2]) / 0.1
    assert torch.equal(a[2], b[2]) and 0.5 < eps.std() < 1.5  # mean + std·ε, the same for the same seed
    batch = collate_latents([i for i in LatentShards(cache7, shuffle=False)][:3])
    lengths = [len(c.split()) for c in batch["caption"]]
    assert batch["text"].shape == (3, max(lengths)) and batch["text_mask"].sum(1).tolist() == lengths
    assert np.allclose(batch["latent"].shape, (3, 3, 2, 2))
