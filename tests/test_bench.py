"""The benchmark harness (bench/run.py) end to end on CPU with tiny budgets: every part runs, the JSON has
its keys with finite numbers, the plots and the markdown exist, peers run when installed (else skip)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
N = 130  # the evaluation needs >= 129 samples (128-d features)


def _run(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *map(str, args)], check=False,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = PRESETS["tiny"]()  # T = 100: NFE 2 and 4, DDPM reference at 10 NFE; random weights are enough here
    cfg.unet.num_classes = 0
    LatentDiffusion.build(cfg, (28, 28)).save(tmp / "model")
    out = tmp / "out"
    proc = _run("--out", out, "--device", "cpu", "--size", "tiny", "--data", "bundled", "--limit", 256,
                "--budget-seconds", 2, "--ld-fraction", 0.5, "--batch-size", 16, "--n-eval", N, "--snapshots", 1,
                "--sample-steps", 2, "--nfe-model", tmp / "model", "--nfe", 2, 4, "--reference-nfe", 10,
                "--parts", "side-by-side", "nfe", "speed", "--speed-train-steps", 4, "--speed-log-every", 2,
                "--speed-limit", 64, "--speed-n", 8, "--speed-batch", 4, "--speed-nfe", 2, 3, "--no-compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_side_by_side_rows(bench):
    _, res = bench
    sbs = res["side_by_side"]
    names = [s["name"] for s in sbs["systems"]]
    assert names[:2] == ["latentdiff", "latentdiff@0.5"]
    for s in sbs["systems"]:
        for key in ("train_images_per_s", "sample_images_per_s", "flops_per_step", "achieved_flops", "fd",
                    "fd_floor", "precision", "recall", "seconds", "train_peak_bytes", "sample_peak_bytes"):
            assert _finite(s[key]), (s["name"], key, s[key])
        assert s["n"] == N and s["steps"] >= 1 and s["flops_per_step"] > 0
        assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
        assert 0 < s["mfu"] < 1  # against the CPU's measured float32 matmul peak
    ld, quarter = sbs["systems"][:2]
    assert ld["budget_seconds"] == 2 and quarter["budget_seconds"] == 1
    assert ld["seconds"] >= 2  # the budget includes the autoencoder and the encoding
    assert ld["params"]["autoencoder"] > 0 and ld["params"]["denoiser"] > 0
    peers = [s for s in sbs["systems"] if not s["name"].startswith("latentdiff")]
    assert len(sbs["ratios"]) == 2 * len(peers)
    for r in sbs["ratios"]:
        peer = next(s for s in peers if s["name"] == r["peer"])
        this = next(s for s in sbs["systems"] if s["name"] == r["latentdiff"])
        assert r["fd"] == pytest.approx(this["fd"] / peer["fd"])
        assert r["train_throughput"] == pytest.approx(this["train_images_per_s"] / peer["train_images_per_s"])


@pytest.mark.parametrize("peer,module", [("diffusers", "diffusers"), ("ddpm", "denoising_diffusion_pytorch")])
def test_peer_ran_or_noted(bench, peer, module):
    _, res = bench
    names = [s["name"] for s in res["side_by_side"]["systems"]]
    if importlib.util.find_spec(module) is None:
        assert any(n.startswith(f"{peer} skipped") for n in res["side_by_side"]["notes"])
        pytest.skip(f"{module} is not installed (bash bench/install_peers.sh); the harness skipped it with a note")
    assert peer in names


def test_quality_vs_time(bench):
    _, res = bench
    points = res["quality_vs_time"]["points"]
    for name in (s["name"] for s in res["side_by_side"]["systems"]):
        mine = [p for p in points if p["system"] == name]
        assert mine and all(_finite(p["fd"]) and _finite(p["seconds"]) for p in mine)
        assert [p["seconds"] for p in mine] == sorted(p["seconds"] for p in mine)


def test_nfe_sweep(bench):
    _, res = bench
    sweep = res["nfe"]
    rows = {(r["sampler"], r["nfe"]): r for r in sweep["rows"]}
    from latentdiff.sampling.samplers import SAMPLERS

    for name in SAMPLERS:
        assert (name, 2) in rows and (name, 4) in rows
    assert ("ddpm", 10) in rows  # the reference
    for (name, nfe), r in rows.items():
        assert _finite(r["fd"]) and _finite(r["seconds"]) and r["images_per_s"] > 0
        assert r["steps"] >= 1
        if name in ("ddpm", "ddim"):
            assert r["nfe_counted"] == nfe  # one network call per step
    assert sweep["reference"]["fd"] == rows[("ddpm", 10)]["fd"]
    assert rows[("ddpm", 10)]["fd_over_reference"] == pytest.approx(1.0)


def test_outputs_written(bench):
    out, res = bench
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -e '.[bench]'): the harness writes no plots")
    for name in ("fd_vs_nfe.png", "fd_vs_seconds.png", "side_by_side.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## Side by side" in md and "## Quality vs NFE" in md and "### Ratios latentdiff / peer" in md
    assert res["machine"]["peak_memory"] == "cpu_ru_maxrss_growth"
    assert "## Issue 5 targets" in md and "## Speed" in md


def test_bad_input_is_one_line():
    proc = _run("--out", "unused", "--n-eval", 10, timeout=60)
    assert proc.returncode == 2
    assert "--n-eval must be at least 129" in proc.stderr and "Traceback" not in proc.stderr


def test_merge_joins_partial_runs(bench):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import merge
    finally:
        sys.path.remove(str(ROOT / "bench"))
    _, res = bench
    systems = res["side_by_side"]["systems"]
    first = {**res, "side_by_side": {**res["side_by_side"], "systems": systems[:1], "ratios": []},
             "quality_vs_time": {"n": N, "points": [p for p in res["quality_vs_time"]["points"]
                                                     if p["system"] == systems[0]["name"]]}}
    first.pop("nfe")
    first.pop("speed")
    rest = {**res, "side_by_side": {**res["side_by_side"], "systems": systems[1:], "notes": []},
            "quality_vs_time": {"n": N, "points": [p for p in res["quality_vs_time"]["points"]
                                                    if p["system"] != systems[0]["name"]]}}
    joined = merge.merge([first, rest])
    assert [s["name"] for s in joined["side_by_side"]["systems"]] == [s["name"] for s in systems]
    assert joined["side_by_side"]["ratios"] == res["side_by_side"]["ratios"]
    assert joined["nfe"] == res["nfe"] and joined["speed"] == res["speed"]
    assert [t["target"] for t in joined["targets"]] == [t["target"] for t in res["targets"]]
    with pytest.raises(ValueError, match="more than one result"):
        merge.merge([first, first])
    other = {**rest, "side_by_side": {**rest["side_by_side"], "budget_seconds": 99}}
    with pytest.raises(ValueError, match="budget_seconds"):
        merge.merge([first, other])


def test_speed_part(bench):
    """The real training loop (train_diffusion, here on a saved model's autoencoder) and the real pipeline."""
    _, res = bench
    train, sample = res["speed"]["train"], res["speed"]["sample"]
    assert train["batch_size"] == 16 and train["flops_per_step"] > 0 and train["steps"] == 4
    assert [r["variant"] for r in train["rows"]] == ["eager, fp32", "eager, fp32, channels_last"]  # CPU, --no-compile
    row = train["rows"][0]
    assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1 and row["speedup_vs_eager"] == 1
    assert row["achieved_flops"] == pytest.approx(train["flops_per_step"] * row["images_per_s"] / 16)
    assert [(r["nfe"], r["batch_size"], r["n"]) for r in sample["rows"]] == [(2, 4, 8), (3, 4, 8)]
    assert all(r["images_per_s"] > 0 and r["speedup_vs_eager_fp32"] == 1 for r in sample["rows"])
    assert [r["nfe"] for r in sample["best"]] == [2, 3]
    names = [t["target"] for t in res["targets"]]
    assert any(n.startswith("training MFU") for n in names) and any("at 3 NFE" in n for n in names)


def _targets(**over):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def system(name, train, sample, fd, budget=100):
        return {"name": name, "train_images_per_s": train, "sample_images_per_s": sample, "fd": fd,
                "budget_seconds": budget}

    res = {"machine": {"device": "test", "device_type": "cpu", "matmul_peak_flops": 1e11, "matmul_peak_dtype": "float32"},
           "side_by_side": {"n_eval": 500, "systems": [
               system("latentdiff", 300, 20, 5), system("latentdiff@0.25", 290, 20, 8, 25),
               system("diffusers", 100, 2, 9), system("ddpm", 50, 1, 10)]},
           "nfe": {"n": 200, "reference": {"nfe": 1000, "fd": 4.0}, "rows": [
               {"sampler": "a", "nfe": 10, "fd_over_reference": 1.2}, {"sampler": "b", "nfe": 10, "fd_over_reference": 1.1},
               {"sampler": "a", "nfe": 20, "fd_over_reference": 1.06}]},
           "demo": {"seconds": 170.0, "threads": 2, "device": "cpu"}}
    for path, value in over.items():
        *keys, last = path.split("__")
        node = res
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
    return report.targets(res)


def _met(targets, prefix):
    (t,) = [t for t in targets if t["target"].startswith(prefix)]
    return t["met"]


def test_targets_decide_met_from_the_numbers():
    t = _targets()
    assert [x["met"] for x in t] == [True, False, True, True, True, True]
    assert "FD at 10 NFE" in t[0]["target"] and "best b 1.10×; 1 of 2" in t[0]["measured"]  # b is within 15%
    assert "FD at 20 NFE" in t[1]["target"]                                                  # 1.06 > 1.05
    assert t[2]["value"] == pytest.approx(3.0) and t[3]["value"] == pytest.approx(10.0)     # vs the faster peer
    # each target flips when its number crosses the line
    assert not _met(_targets(side_by_side__systems__2__train_images_per_s=101), "training throughput")
    assert not _met(_targets(side_by_side__systems__0__fd=9.5), "sampling throughput")
    assert not _met(_targets(side_by_side__systems__3__sample_images_per_s=2.1), "sampling throughput")
    assert not _met(_targets(side_by_side__systems__1__fd=9), "better FD than both peers")
    assert not _met(_targets(demo__seconds=181.0), "`latentdiff demo`")
    assert _met(_targets(demo__device="cuda"), "`latentdiff demo`") is None  # the 3-minute target is a CPU one


def test_presets_hold_the_documented_settings_and_yield_to_options():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    gpu = run.parse_args(["--preset", "gpu", "--out", "x"])
    assert (gpu.device, gpu.budget_seconds, gpu.ld_fraction, gpu.n_eval, gpu.size) == ("cuda", 240, 0.25, 10_000, "full")
    assert gpu.parts == list(run.PARTS) and gpu.speed_model == gpu.nfe_model
    cpu = run.parse_args(["--preset", "cpu", "--out", "x", "--n-eval", "500", "--parts", "nfe"])
    assert (cpu.device, cpu.n_eval, cpu.parts, cpu.n_snapshot) == ("cpu", 500, ["nfe"], 150)
    plain = run.parse_args(["--out", "x"])
    assert plain.device == "auto" and plain.n_eval == 10_000
