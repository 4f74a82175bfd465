"""Stage 2 from the sharded latent cache: random access by index, rank-parallel builds, and `train` on a
captioned folder that is never loaded into memory, with the same numbers as training from memory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.captioned import CaptionedImages
from latentdiff.data.latent_cache import LatentCache, LatentShards, build_latent_cache, finish_latent_cache
from latentdiff.errors import DataError
from latentdiff.utils.state import load_state
from tests.conftest import run_cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 RGB images of 20×20 (resized to 16) with metadata.jsonl: a coloured disc or square on white."""
    root = tmp_path_factory.mktemp("captioned") / "set"
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(24):
        name, rgb = list(COLOURS.items())[i % 4]
        shape = "disc" if i % 2 else "square"
        im = Image.new("RGB", (20, 20), (255, 255, 255))
        yy, xx = np.mgrid[:20, :20]
        r = 4 + i % 5
        inside = (np.hypot(yy - 10, xx - 10) < r) if shape == "disc" else (abs(yy - 10) < r) & (abs(xx - 10) < r)
        a = np.asarray(im).copy()
        a[inside] = rgb
        Image.fromarray(a).save(root / "img" / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img/{i:02d}.png", "text": f"a {name} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


class _Pool:
    """A stand-in codec: 4×4 average pooling is the mean, a constant the std; text = word lengths."""

    @staticmethod
    def images(x):
        mean = torch.nn.functional.avg_pool2d(x, 4)
        return mean, torch.full_like(mean, 0.1)

    @staticmethod
    def text(captions):
        ids = [[len(w) for w in c.split()] for c in captions]
        out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, t in enumerate(ids):
            out[i, :len(t)] = torch.tensor(t)
        return out, out != 0


def test_rows_by_index_match_the_streamed_items(folder, tmp_path):
    ds = CaptionedImages(folder, 16)
    cache = build_latent_cache(ds, tmp_path / "c", encode_images=_Pool.images, encode_text=_Pool.text, shard_size=5,
                               batch_size=2)
    streamed = {i["index"]: i for i in LatentShards(cache, shuffle=False, sample=False)}
    idx = [23, 0, 7, 7, 12, 4]  # across shards, repeated, out of order
    rows = cache.rows(idx)
    assert rows["mean"].shape == (6, 3, 4, 4) and rows["mean"].dtype == torch.float32
    for j, k in enumerate(idx):
        assert torch.equal(rows["mean"][j], streamed[k]["latent"])
        n = int(streamed[k]["text_mask"].sum())
        assert torch.equal(rows["text"][j, :n], streamed[k]["text"][:n]) and rows["text_mask"][j].sum() == n
    assert rows["text"].shape[1] == max(len(ds.records[k]["text"].split()) for k in idx)  # trimmed to the longest
    with pytest.raises(DataError, match="out of range"):
        cache.rows([24])
    small = LatentCache(tmp_path / "c", open_shards=2)
    for k in range(24):  # the open mappings stay bounded
        small.rows([k, 23 - k])
        assert len(small._mapped) <= 2


def test_ranks_build_disjoint_shards_and_the_result_is_the_same(folder, tmp_path):
    ds = CaptionedImages(folder, 16)
    one = build_latent_cache(ds, tmp_path / "one", encode_images=_Pool.images, shard_size=5)
    for rank in (1, 0):  # without a process group each rank writes its shards and returns
        assert build_latent_cache(ds, tmp_path / "two", encode_images=_Pool.images, shard_size=5, rank=rank,
                                  world_size=2) is None
        if rank == 1:
            assert sorted(p.name for p in (tmp_path / "two").glob("*.json")) == ["shard-00001.json", "shard-00003.json"]
            with pytest.raises(DataError, match="3 of 5 shards|2 of 5 shards"):
                finish_latent_cache(tmp_path / "two")
    two = finish_latent_cache(tmp_path / "two")
    assert two.counts == one.counts == [5, 5, 5, 5, 4]
    assert torch.equal(two.rows(range(24))["mean"], one.rows(range(24))["mean"])


def test_an_interrupted_shard_is_encoded_again(folder, tmp_path):
    ds = CaptionedImages(folder, 16)
    build_latent_cache(ds, tmp_path / "c", encode_images=_Pool.images, shard_size=10)
    (tmp_path / "c" / "index.json").unlink()  # as if the build stopped before finishing
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])  # and shard 1 was damaged
    calls = []
    cache = build_latent_cache(ds, tmp_path / "c", encode_images=lambda x: calls.append(len(x)) or _Pool.images(x),
                               shard_size=10)
    assert sum(calls) == 10 and len(cache) == 24  # only shard 1 again
    assert torch.equal(cache.rows([15])["mean"][0], _Pool.images(ds[15]["image"][None])[0][0])


OVERRIDES = ["text.encoder=bytes", "text.width=64", "text.layers=1", "text.max_tokens=16", "conditional=false",
             "unet.cross_attention_levels=[1]", "training.steps=3", "autoencoder_training.steps=2", "data.image_size=16",
             "training.log_every=1", "training.batch_size=8", "training.checkpoint_every=3"]


def test_train_from_the_cache_streams_the_folder_and_matches_training_in_memory(folder, tmp_path, monkeypatch):
    from latentdiff.data import datasets, limits
    from latentdiff.pipeline import LatentDiffusion
    from latentdiff.pipeline.config import load_config
    from latentdiff.training import autoencoder as A
    from latentdiff.training import diffusion as D

    memory, cached = tmp_path / "memory", tmp_path / "cached"
    A.train_autoencoder(load_config(preset="tiny", overrides=OVERRIDES + [f"data.source={folder}"]), memory,
                        progress=False)
    cached.mkdir()
    shutil.copy(memory / "autoencoder.safetensors", cached / "autoencoder.safetensors")
    D.train_diffusion(load_config(preset="tiny", overrides=OVERRIDES + [f"data.source={folder}"]), memory,
                      progress=False)

    monkeypatch.setattr(limits, "MAX_LOADED_BYTES", 24 * 16 * 16 * 3 - 1)  # the folder no longer fits in memory
    with pytest.raises(DataError, match="latent_cache=auto"):
        datasets.load_dataset(str(folder), image_size=16)

    def refuse(*args, **kwargs):
        raise AssertionError("the cached run loaded the whole folder into memory")

    monkeypatch.setattr(datasets, "load_captioned", refuse)
    cfg = load_config(preset="tiny", overrides=OVERRIDES + [f"data.source={folder}", "data.latent_cache=auto"])
    D.train_diffusion(cfg, cached, progress=False)
    index = json.loads((cached / "latent-cache" / "index.json").read_text())
    assert index["complete"] and sum(s["count"] for s in index["shards"]) == 24
    losses = [[json.loads(line)["loss"] for line in (run / "denoiser_metrics.jsonl").read_text().splitlines()]
              for run in (memory, cached)]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)  # same batches, noise and tokens
    w_memory = load_state(memory / "checkpoints" / "denoiser-00000003.safetensors")[0]
    w_cached = load_state(cached / "checkpoints" / "denoiser-00000003.safetensors")[0]
    for name, w in w_memory.items():
        if name.startswith("model."):
            torch.testing.assert_close(w_cached[name], w, rtol=0, atol=1e-6, msg=name)
    pipe = LatentDiffusion.load(cached)
    images, _ = pipe.generate(2, prompt="a red disc", steps=4, seed=0)
    assert images.shape == (2, 16, 16, 3)
    # A second run reuses the finished cache (nothing is encoded again); another codec is refused.
    from latentdiff.data import latent_cache

    monkeypatch.setattr(latent_cache, "_encode_shards", lambda *a, **k: pytest.fail("re-encoded a finished cache"))
    D.train_diffusion(cfg, cached, progress=False, overwrite=True)


def test_cli_train_with_a_latent_cache_and_a_bad_value(folder, tmp_path):
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--data", str(folder), "--image-size", "16", "--run-dir", str(run), "--no-progress",
              *[a for o in OVERRIDES[:6] for a in ("--set", o)]]
    assert run_cli("train-autoencoder", *common, "--steps", "1")[0] == 0
    code, _, err = run_cli("train", *common, "--steps", "2", "--set", f"data.latent_cache={tmp_path / 'cache'}",
                           "--set", "data.workers=2")
    assert code == 0, err
    assert (tmp_path / "cache" / "index.json").is_file() and (run / "denoiser.safetensors").is_file()
    code, _, err = run_cli("train", *common, "--steps", "2", "--set", "data.workers=-1", "--overwrite")
    assert code == 2 and err.strip().count("\n") == 0 and "data.workers" in err
