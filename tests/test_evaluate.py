"""Evaluation: FD rankings of degraded sets, the real-vs-real floor, class accuracy, autoencoder scores,
and the `eval` / `eval-autoencoder` commands (end to end, and one clear line with exit code 2 on bad input)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from latentdiff.cli import main as cli
from latentdiff.data import CLASS_NAMES, load_dataset
from latentdiff.errors import ConfigError, DataError
from latentdiff.evaluation import evaluate as evaluation
from latentdiff.evaluation.evaluate import EXTRACTOR_NAMES, _subset, evaluate_autoencoder, evaluate_samples
from latentdiff.evaluation.features import EXTRACTORS, Extractor, InceptionExtractor
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
N = 200  # > 129, the minimum for a full-rank covariance of the classifier's 128-d features


@pytest.fixture(scope="module")
def train():
    return load_dataset("bundled", "train")


@pytest.fixture(scope="module")
def real(train):
    return train.images[-N:], train.labels[-N:]  # real images, disjoint from the test reference


def score(images, labels=None, **kw):
    return evaluate_samples(images, labels, reference="bundled", **kw)


def noised(images, sigma, seed=0):
    x = images / 255.0 + np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(x, 0, 1)


def test_fd_ranks_degradations_and_repeated_image_has_no_recall(real):
    images, _ = real
    r_real = score(images)
    r_noise = [score(noised(images, s)) for s in (0.05, 0.15, 0.4)]
    r_blur = [score(gaussian_filter(images / 255.0, sigma=(0, s, s, 0))) for s in (1.0, 2.5)]
    single = score(np.repeat(images[:1], N, axis=0))  # mode collapse
    fd_noise = [r_real["fd"]] + [r["fd"] for r in r_noise]
    assert fd_noise == sorted(fd_noise) and len(set(fd_noise)) == 4, fd_noise  # more noise, larger FD
    assert r_real["fd"] < r_noise[1]["fd"] < r_blur[1]["fd"] < single["fd"], (r_noise[1], r_blur[1], single)
    assert 3 * r_real["fd"] < r_blur[0]["fd"] < r_blur[1]["fd"]
    recalls = [r_real["recall"]] + [r["recall"] for r in r_noise]
    assert recalls == sorted(recalls, reverse=True) and recalls[0] > 0.8, recalls
    # a single repeated real image: every sample is realistic (precision 1) but nothing is covered (recall 0)
    assert single["recall"] <= 0.01 and single["precision"] > 0.9, single
    # real images score like the real-vs-real floor, with high precision
    assert r_real["fd"] < 3 * r_real["fd_floor"] and r_real["precision"] > 0.8, r_real
    assert {"fd", "fd_floor", "precision", "recall", "n", "extractor"} <= set(r_real) and r_real["n"] == N
    assert "cond_acc" not in r_real and r_real["extractor"] == "fashion-mnist-classifier"


def test_floor_is_the_fd_of_a_fixed_train_subset(train):
    """Scoring exactly the floor's training images must reproduce the floor, and it is deterministic."""
    idx = _subset(len(train), N, 0)
    result = score(train.images[idx])
    assert result["fd"] == pytest.approx(result["fd_floor"], rel=1e-9, abs=1e-12)
    assert result["n_floor"] == N and result["n_reference"] == 2000 and result["n_precision_recall"] == N
    assert score(train.images[idx])["fd_floor"] == result["fd_floor"]


def test_cond_acc_uses_the_labels(real):
    images, labels = real
    assert score(images, labels)["cond_acc"] >= 0.85
    wrong = (labels + 1) % 10
    assert score(images, wrong)["cond_acc"] <= 0.1


@pytest.mark.parametrize("make,error,needle", [
    (lambda x: x[:100], DataError, "at least 129 images"),
    (lambda x: np.zeros((N, 32, 32), np.uint8), DataError, "32×32×1 (H×W×C) but the reference images"),
    (lambda x: np.full((N, 28, 28), np.nan), DataError, "NaN"),
    (lambda x: x.astype(np.int32), DataError, "unsupported dtype int32"),
    (lambda x: x.transpose(0, 3, 1, 2), DataError, "channels last"),
])
def test_bad_images_are_refused(real, make, error, needle):
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        score(make(real[0]))


def test_bad_labels_and_options_are_refused(real):
    images, labels = real
    with pytest.raises(DataError, match="one entry per image"):
        score(images, labels[:-1])
    with pytest.raises(DataError, match=r"in 0\.\.9"):
        score(images, labels + 5)
    with pytest.raises(ConfigError, match="unknown reference"):
        evaluate_samples(images, reference="cifar")
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        score(images, k=0)


class TinyExtractor(Extractor):
    """A user-supplied extractor as a library user would write one: no `key`, random 8-d projection."""

    name, dim = "tiny", 8

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        super().__init__(torch.nn.Linear(28 * 28, self.dim), "cpu")

    def _forward(self, x):
        return self.net(x.flatten(1))  # B×784 -> B×8


def _fresh_fd(images, ext, **kw):
    """The FD computed with empty per-process caches: what the result must be."""
    saved = [dict(c) for c in (evaluation._FEATURES, evaluation._STATS)]
    evaluation._FEATURES.clear(), evaluation._STATS.clear()
    try:
        return score(images, extractor=ext, **kw)["fd"]
    finally:
        for cache, old in zip((evaluation._FEATURES, evaluation._STATS), saved):
            cache.clear()
            cache.update(old)


def test_user_extractors_without_key_never_share_reference_features(real):
    images = real[0][:50]
    a, b = TinyExtractor(0), TinyExtractor(1)
    assert a.key == b.key == "" and a.cache_key() != b.cache_key()
    fd_a, fd_b = score(images, extractor=a)["fd"], score(images, extractor=b)["fd"]
    assert fd_b == pytest.approx(_fresh_fd(images, b), rel=1e-9) and fd_a != fd_b
    with torch.no_grad():  # weights changed in place: a new key, new reference features
        a.net.weight.mul_(2)
    assert score(images, extractor=a)["fd"] == pytest.approx(_fresh_fd(images, a), rel=1e-9)


def test_reference_smaller_than_feature_dim_is_refused():
    # the bundled test split has 2000 images, inception features 2048 dimensions; refused before any feature
    ext = InceptionExtractor(_random_init=True)
    with pytest.raises(DataError, match=r"2000 reference images \(bundled Fashion-MNIST subset \(test\)\) are "
                                        r"too few: .* 2048-d inception features needs at least 2049"):
        score(np.zeros((2100, 28, 28), np.uint8), extractor=ext)


def test_floor_on_fewer_training_images_is_noted(real, monkeypatch):
    small_train = load_dataset("bundled", "train", limit=120)
    original = evaluation._reference_data
    monkeypatch.setattr(evaluation, "_reference_data",
                        lambda ref, split, d: small_train if split == "train" else original(ref, split, d))
    images = real[0][:150]
    result = score(images, extractor=TinyExtractor(0))
    assert result["n_floor"] == 120 and result["n"] == 150
    assert any("all 120 training images" in note and "150 samples" in note for note in result["notes"])
    assert "notes" not in score(real[0][:100], extractor=TinyExtractor(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model: enough to exercise generation and reconstruction (scores are poor)."""
    path = tmp_path_factory.mktemp("model")
    LatentDiffusion.build(load_config(preset="tiny"), (28, 28), CLASS_NAMES).save(path)
    return path


def test_evaluate_autoencoder_scores_reconstructions(model_dir):
    result = evaluate_autoencoder(str(model_dir), n=150, reference="bundled")
    assert result["n"] == 150 and np.isfinite(result["psnr"]) and -1 <= result["ssim"] <= 1
    # an untrained codec reconstructs badly: far above the real-vs-real floor
    assert result["fd_unpaired"] > 3 * result["fd_floor"] > 0 and result["fd"] > 0, result


def test_perfect_autoencoder_scores_zero_paired_and_the_floor_unpaired(model_dir):
    pipe = LatentDiffusion.load(str(model_dir), "cpu")
    # a perfect autoencoder: encode(x).mean = x, decode(z) = z
    pipe.autoencoder.encode = lambda x: SimpleNamespace(mean=x)
    pipe.autoencoder.decode = lambda z: z
    result = evaluate_autoencoder(pipe, n=150, reference="bundled")
    # the paired FD compares the originals with themselves; only the unpaired one has a floor, and meets it
    assert result["fd"] == pytest.approx(0, abs=1e-6) and result["psnr"] == np.inf
    assert result["fd_unpaired"] == pytest.approx(result["fd_floor"], rel=1e-9) and result["fd_floor"] > 0


# ----------------------------------------------------------------------------- the command line


def main(capsys, *args):
    """Run `latentdiff ARGS` in-process (the code `python -m latentdiff` runs): (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def samples(tmp_path_factory, train):
    path = tmp_path_factory.mktemp("samples") / "s.npz"
    np.savez(path, images=train.images[:150, :, :, 0], labels=train.labels[:150])
    return path


def test_eval_samples_end_to_end_through_python_m(samples):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "latentdiff", "eval", "--samples", str(samples), "--reference",
                           "bundled", "--json"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("fd", "fd_floor", "precision", "recall", "n", "extractor", "cond_acc"):
        assert key in result, key
    assert result["n"] == 150 and result["cond_acc"] > 0.85 and 0 <= result["precision"] <= 1
    fd_row = next(ln for ln in lines if ln.strip().startswith("FD"))
    assert f"{result['fd']:.4f}" in fd_row and f"{result['fd_floor']:.4f}" in fd_row  # FD beside its floor
    # the samples' class accuracy beside the classifier's accuracy on real test images
    acc_row = next(ln for ln in lines if ln.strip().startswith("class accuracy"))
    assert 0.85 < result["cond_acc_real"] < 1 and f"{result['cond_acc_real']:.4f}" in acc_row


def test_eval_model_and_eval_autoencoder_commands(capsys, model_dir):
    code, out, err = main(capsys, "eval", "--model", model_dir, "--n", 130, "--steps", 2, "--reference", "bundled",
                          "--json", "--no-progress", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 130 and result["steps"] == 2 and "cond_acc" in result and result["model"] == str(model_dir)
    code, out, err = main(capsys, "eval-autoencoder", "--model", model_dir, "--n", 130, "--reference", "bundled",
                          "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"psnr", "ssim", "fd", "fd_unpaired", "fd_floor", "n"} <= set(result) and result["n"] == 130
    assert "PSNR" in out and "SSIM" in out and "real-vs-real" not in out
    paired = next(ln for ln in out.splitlines() if "recon FD, paired" in ln)
    unpaired = next(ln for ln in out.splitlines() if "recon FD vs train" in ln)
    assert f"{result['fd_floor']:.4f}" not in paired and f"{result['fd_floor']:.4f}" in unpaired


def test_eval_model_refuses_a_small_reference_before_sampling(capsys, model_dir):
    code, _, err = main(capsys, "eval", "--model", model_dir, "--n", 2100, "--extractor", "inception",
                        "--reference", "bundled", "--device", "cpu", "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert "2000 reference images (bundled Fashion-MNIST subset (test)) are too few" in err


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_eval_bad_input_one_line_exit_2(capsys, tmp_path, samples, train):
    imgs = train.images[:150, :, :, 0]
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    cases = [
        (["--model", "m", "--samples", samples], "not allowed with argument"),
        ([], "one of the arguments --model --samples is required"),
        (["--samples", _npz(tmp_path, "noimg.npz", pictures=imgs)], "has no `images` array (it holds: pictures)"),
        (["--samples", _npz(tmp_path, "dtype.npz", images=imgs.astype(np.int64))], "unsupported dtype int64"),
        (["--samples", _npz(tmp_path, "shape.npz", images=imgs[0])], "expected a batch of images"),
        (["--samples", _npz(tmp_path, "nan.npz", images=np.full((150, 28, 28), np.nan))], "NaN"),
        (["--samples", _npz(tmp_path, "few.npz", images=imgs[:20])], "needs at least 129 images"),
        (["--model", tmp_path / "not-loaded", "--n", 50], "needs at least 129 images"),  # checked before sampling
        (["--samples", _npz(tmp_path, "size.npz", images=np.zeros((150, 32, 32), np.uint8))],
         "sample images are 32×32×1 (H×W×C) but the reference images"),
        (["--samples", _npz(tmp_path, "labels.npz", images=imgs, labels=np.full(150, 12))], "in 0..9"),
        (["--samples", tmp_path / "corrupt.npz"], "cannot read samples file"),
        (["--samples", tmp_path / "missing.npz"], "samples file not found"),
        (["--samples", samples, "--steps", 5], "--steps only apply with --model"),
        (["--samples", samples, "--extractor", "vgg"], "invalid choice: 'vgg'"),
        (["--samples", samples, "--extractor", "inception"], "needs a weight file"),
        (["--samples", samples, "--extractor", "inception", "--inception-weights", tmp_path / "no.pth"],
         "inception weights file not found"),
    ]
    for args, needle in cases:
        code, _, err = main(capsys, "eval", *args, "--reference", "bundled")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, code, err)
        assert lines[0].startswith("latentdiff: error:") and "Traceback" not in err
    code, _, err = main(capsys, "eval-autoencoder", "--model", tmp_path / "no-model")
    assert code == 2 and "model directory not found" in err and err.count("\n") == 1


def test_eval_help_documents_every_option(capsys):
    assert EXTRACTOR_NAMES == tuple(EXTRACTORS)  # --extractor's choices are the registered extractors
    assert cli.main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--samples", "--n", "--sampler", "--steps", "--guidance", "--seed", "--batch-size",
                   "--extractor", "--inception-weights", "--reference", "--device", "--json"):
        assert option in out, option
