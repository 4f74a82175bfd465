"""Smoke test of bench/guidance.py on a tiny untrained model (seconds)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from latentdiff.models.classifier import ClassifierConfig, NoisyClassifier, save_classifier
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench" / "guidance.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_guidance", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "model"
    torch.manual_seed(0)
    pipe = LatentDiffusion.build(load_config(preset="tiny", overrides=["unet.num_classes=10"]), (28, 28))
    pipe.save(d)
    ae = pipe.autoencoder
    save_classifier(NoisyClassifier(ClassifierConfig(in_channels=ae.cfg.latent_channels, base_channels=8,
                                                     num_res_blocks=1)), d / "classifier.safetensors",
                    {"latent_shape": list(ae.latent_shape), "num_train_steps": pipe.denoiser.schedule.num_steps,
                     "latent_stats": ae.latent_stats()})
    return d


def test_guidance_bench_smoke(bench, model_dir, tmp_path, capsys):
    code = bench.main(["--model", str(model_dir), "--n", "130", "--steps", "2", "--reference", "bundled",
                       "--cfg-scales", "0,1", "--classifier-scales", "1", "--json", str(tmp_path / "g.json"),
                       "--md", str(tmp_path / "g.md"), "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "g.json").read_text())
    assert printed == result
    rows = result["settings"]
    assert [(r["cfg_scale"], r["classifier_scale"]) for r in rows] == [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    for r in rows:
        assert 0 <= r["cond_acc"] <= 1 and r["fd"] > 0 and r["fd_floor"] > 0 and 0 <= r["precision"] <= 1
    table = (tmp_path / "g.md").read_text().splitlines()
    assert table[2].startswith("| CFG scale") and len(table) == 4 + len(rows)
    assert sum("(default)" in line for line in table) == 1 and "| 1 (default) | 0 |" in "\n".join(table)


def test_guidance_bench_small_n_reports_accuracy_only(bench, model_dir, capsys):
    assert bench.main(["--model", str(model_dir), "--n", "12", "--steps", "1", "--cfg-scales", "1",
                       "--classifier-scales", "", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["settings"]
    assert set(row) == {"cfg_scale", "classifier_scale", "cond_acc", "sample_seconds"} and result["reference"] is None


def test_guidance_bench_errors(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--cfg-scales", "1,-2"])
    assert bench.main(["--model", str(tmp_path / "missing"), "--n", "2"]) == 2
    assert "model directory not found" in capsys.readouterr().err
