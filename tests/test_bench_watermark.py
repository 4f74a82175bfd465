"""Smoke test of bench/watermark.py on a handful of images: the parallel attack workers give the serial result."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "watermark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_watermark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_watermark"] = module  # the forked workers pickle attacked_row by its module's name
    spec.loader.exec_module(module)
    return module


def test_workers_give_the_serial_rows_and_the_outputs_are_written(bench, tmp_path):
    argv = ["--model", "pretrained:fashion-mnist", "--real", "6", "--samples", "4", "--edits", "2",
            "--negatives", "4", "--steps", "2", "--fd-seeds", "3", "--workers", "2",
            "--json", str(tmp_path / "w.json"), "--md", str(tmp_path / "w.md")]
    parallel = bench.main(argv)
    assert [r["attack"] for r in parallel["rows"]] == list(bench.ATTACKS)
    # the same attack in this process, on the context main left behind: equal up to the float rounding of one
    # thread (the workers) against several (here)
    serial = bench.attacked_row("jpeg75")
    assert serial.keys() == parallel["rows"][1].keys()
    for name, value in serial.items():
        assert parallel["rows"][1][name] == (value if isinstance(value, str) or value is None
                                             else pytest.approx(value, rel=1e-4, abs=1e-6)), name
    assert parallel["fd"] is None  # 4 samples: fewer than the features' dimensions
    assert json.loads((tmp_path / "w.json").read_text())["rows"] == parallel["rows"]
    assert "| clean |" in (tmp_path / "w.md").read_text()
    assert "A" in bench._ATTACK_CONTEXT["sets"] and not {"B", "C"} & set(bench._ATTACK_CONTEXT["sets"])


def test_fd_line_puts_the_watermarked_fd_against_every_seed(bench):
    assert "outside the range" in bench.fd_line({"wm": 3.87, "A": 3.62, "B": 3.76})
    line = bench.fd_line({"wm": 3.70, "A": 3.62, "B": 3.76, "C": 3.90})
    assert "seed C 3.90" in line and "range 3.62–3.90, spread 0.28" in line and "inside the range" in line
    with pytest.raises(SystemExit):
        bench.main(["--fd-seeds", "1"])


def test_fd_cost_parts_split_the_residual_into_its_colour_cast_shared_pattern_and_the_rest(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from latentdiff.models.marknet import MarkEmbedder, MarkExtractor
    from latentdiff.pipeline.decoder_mark import MarkNets

    monkeypatch.syspath_prepend(str(BENCH.parent))  # the strength bench imports its helpers from bench/watermark.py
    spec = importlib.util.spec_from_file_location("bench_strength", BENCH.parent / "decoder_mark_strength.py")
    strength = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strength)
    torch.manual_seed(0)
    plain = np.random.default_rng(0).integers(60, 200, (6, 8, 8, 3)).astype(np.uint8)  # no clipping
    bits = np.array([1, 0, 1, 1])

    def parts(zero_mean: bool, odd: bool = False, covers: np.ndarray = plain) -> dict:
        torch.manual_seed(0)
        emb = MarkEmbedder(3, 8, 4, 4, zero_mean=zero_mean, odd=odd)
        torch.nn.init.constant_(emb.mix[-1].bias, 0.2)  # a cast of 0.2·127.5 levels
        nets = MarkNets(emb.eval(), MarkExtractor(3, 8, 4, 4).eval(), {"bits": 4})
        # a stand-in for the FD cost: the squared shift of the mean colour, which only a cast moves
        return strength.fd_cost_parts(nets, bits, covers, lambda imgs: float(
            ((imgs.astype(np.float64).mean((0, 1, 2)) - covers.mean((0, 1, 2))) ** 2).sum()))

    cast = parts(False)
    assert min(cast["mean_cast_per_channel"]) > 10
    assert cast["fd_cost_cast_only"] == pytest.approx(cast["fd_cost_full"], rel=0.02)
    assert cast["fd_cost_without_cast"] < 0.01 * cast["fd_cost_full"]
    assert cast["fd_cost_gaussian_same_psnr"] < 0.01 * cast["fd_cost_full"]
    # the bias's cast is the same for every message: nearly all of it is in the shared part (an untrained net's
    # message part adds a cast of its own, smaller, that differs from message to message)
    assert cast["fd_cost_shared_only"] == pytest.approx(cast["fd_cost_full"], rel=0.15)
    assert cast["fd_cost_without_shared"] < 0.01 * cast["fd_cost_full"]
    power = cast["residual_power"]
    assert power["shared"] > 0.5 * power["full"]
    flat = parts(True)
    assert max(abs(v) for v in flat["mean_cast_per_channel"]) < 0.5 and flat["fd_cost_full"] < 0.5
    assert flat["saturated_fraction"] == 0 and flat["fd_cost_saturated_shift_only"] == 0  # nothing at 0 or 255
    white = plain.copy()
    white[:, :4] = 255  # half of each image white: a zero-mean residual can only darken it
    clipped = parts(True, covers=white)
    assert clipped["saturated_fraction"] == 0.5 and clipped["mean_shift_on_saturated"] < -0.5
    assert clipped["fd_cost_saturated_shift_only"] > 0.5 * clipped["fd_cost_full"] > 0
    odd = parts(True, odd=True)["residual_power"]  # nothing shared, but the rounding to 8 bits
    assert odd["full"] > 1 and odd["shared"] < 0.02 * odd["full"]


@pytest.mark.filterwarnings("ignore:feature_stats")
def test_strength_bench_main_writes_every_key_and_names_the_nets_file_only(tmp_path, monkeypatch):
    import shutil

    from latentdiff.pipeline.decoder_mark import asset_path

    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_strength_main", BENCH.parent / "decoder_mark_strength.py")
    strength = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strength)
    nets = tmp_path / "candidate nets.safetensors"
    shutil.copy(asset_path(28, 1), nets)
    out = tmp_path / "s.json"
    result = strength.main(["--model", "pretrained:fashion-mnist", "--samples", "6", "--real", "8", "--steps", "2",
                            "--scales", "1", "0.5", "--keys", "2", "--nets", str(nets), "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["nets"] == "candidate nets.safetensors"  # the name: no machine's path in a committed result
    assert set(result) >= {"fd_unmarked", "fpr", "rows", "fd_cost_parts", "shipped_scale", "seconds"}
    assert set(result["fpr"]) == set(strength.ATTACKS)
    per_key = result["fd_cost_per_key"]
    assert per_key["keys"] == 2 and per_key["min"] <= per_key["mean"] <= per_key["max"]
    assert len(set(per_key["each"])) == 2  # two keys, two different marks
    full, half = result["rows"]
    assert set(full["tpr"]) == set(strength.ATTACKS)
    assert half["psnr"] == pytest.approx(full["psnr"] + 6.02, abs=0.6)  # half the residual: a quarter of its power
    assert full["tpr"]["clean"] >= half["tpr"]["clean"]
