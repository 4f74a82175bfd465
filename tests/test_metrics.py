"""Tests for latentdiff.metrics: analytic cases, skimage cross-checks, rankings and bad input."""

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from latentdiff.errors import DataError
from latentdiff.evaluation.metrics import (
    check_images,
    check_same_size,
    classification_accuracy,
    fd_from_features,
    feature_stats,
    frechet_distance,
    precision_recall,
    psnr,
    ssim,
)


def structured_images(n, h=28, w=28, c=None, seed=0):
    """Smooth, real-ish images in [0, 1]: gradients + blurred noise + a bright rectangle and disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = c or 1
    out = np.empty((n, h, w, chans))
    for i in range(n):
        for ch in range(chans):
            a, b = rng.uniform(-1, 1, 2)
            img = 0.5 + 0.25 * (a * xx + b * yy)
            img = img + 0.3 * gaussian_filter(rng.normal(size=(h, w)), sigma=rng.uniform(1, 3))
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            img[y0 : y0 + h // 3, x0 : x0 + w // 4] += rng.uniform(0.2, 0.5)
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 6)
            img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = 0.05
            out[i, :, :, ch] = img
    out = np.clip(out, 0, 1)
    return out[..., 0] if c is None else out


# ---------------------------------------------------------------------------------------------
# PSNR


def test_psnr_constant_difference_is_analytic():
    a = np.full((3, 16, 12), 0.2)
    for d in (0.01, 0.1, 0.5):
        got = psnr(a, a + d)
        np.testing.assert_allclose(got, 20 * math.log10(1 / d), rtol=1e-9)
        assert got.shape == (3,)


def test_psnr_data_range_scales():
    a = np.full((1, 8, 8), 0.3)
    assert psnr(a, a + 0.1, data_range=2.0)[0] == pytest.approx(20 * math.log10(2 / 0.1))


def test_psnr_identical_is_inf_and_others_finite():
    x = structured_images(3)
    y = x.copy()
    y[1] = np.clip(y[1] + 0.05, 0, 1)
    got = psnr(x, y)
    assert np.isinf(got[0]) and got[0] > 0 and np.isinf(got[2])
    assert np.isfinite(got[1])


def test_psnr_uint8_and_float_agree():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (4, 10, 9, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 10, 9, 3), dtype=np.uint8)
    np.testing.assert_allclose(psnr(a, b), psnr(a / 255.0, b / 255.0), rtol=1e-12)
    np.testing.assert_allclose(psnr(a, b), psnr(a, b / 255.0), rtol=1e-12)  # mixed dtypes


# ---------------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage(rgb, kind):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    c = 3 if rgb else None
    if kind == "random":
        shape = (4, 28, 23) + ((3,) if rgb else ())
        a, b = rng.uniform(size=shape), rng.uniform(size=shape)
    else:
        a = structured_images(4, 28, 23, c=c, seed=3)
        b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
        b[1] = structured_images(1, 28, 23, c=c, seed=4)[0]  # an unrelated pair too
    ours = ssim(a, b)
    ref = [
        skm.structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1 if rgb else None)
        for i in range(len(a))
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # uint8 inputs vs skimage on the same uint8 data with data_range 255
    a8, b8 = (np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8))
    ref8 = [
        skm.structural_similarity(a8[i], b8[i], data_range=255, channel_axis=-1 if rgb else None)
        for i in range(len(a))
    ]
    np.testing.assert_allclose(ssim(a8, b8), ref8, atol=1e-4)


def test_ssim_identical_is_one_and_symmetric():
    a = structured_images(3, c=3, seed=5)
    a[2] = 0.4  # constant image: SSIM of identical constant images is still 1
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    b = np.clip(a + np.random.default_rng(6).normal(0, 0.1, a.shape), 0, 1)
    s_ab, s_ba = ssim(a, b), ssim(b, a)
    np.testing.assert_allclose(s_ab, s_ba, atol=1e-12)
    assert (s_ab < 0.99).all()


def test_ssim_decreases_with_noise():
    a = structured_images(4, seed=7)
    rng = np.random.default_rng(8)
    scores = [ssim(a, np.clip(a + rng.normal(0, s, a.shape), 0, 1)).mean() for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]


def test_ssim_too_small_image():
    with pytest.raises(DataError, match="smaller"):
        ssim(np.zeros((1, 5, 5)), np.zeros((1, 5, 5)))


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(9)
    d = 6
    v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_fd_non_diagonal_vs_sqrtm_reference():
    rng = np.random.default_rng(10)
    d = 8
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(want, rel=1e-8)


def test_fd_same_features_is_zero_and_other_positive():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10))
    assert fd_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fd_from_features(x, x + 1.0) == pytest.approx(10.0, rel=1e-9)  # mean shift only


def test_fd_rank_deficient_is_finite():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(12, 40)) + 0.5
    with pytest.warns(UserWarning, match="samples"):
        fd = fd_from_features(x, y)
    assert np.isfinite(fd) and fd > 0
    with pytest.warns(UserWarning):
        same = fd_from_features(x, x)
    assert same == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(x, rowvar=False)))


def _fd_referee(f1: np.ndarray, f2: np.ndarray) -> float:
    """Float64 FD from the features themselves, without any covariance square root.

    With centred X1 (n1×D), X2 (n2×D): Σi = XiᵀXi/(ni-1), and the non-zero eigenvalues of Σ1Σ2 are those of
    M Mᵀ/((n1-1)(n2-1)) with M = X1 X2ᵀ (n1×n2), so Tr (Σ1Σ2)^½ = ‖M‖_* / √((n1-1)(n2-1)).
    """
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    tr_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / math.sqrt(n1 * n2)
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (x1 ** 2).sum() / n1 + (x2 ** 2).sum() / n2 - 2 * tr_covmean)


def test_fd_n_below_d_steep_spectrum_matches_float64_referee():
    """N < D with eigenvalues spanning 10 decades: the old eigenvalue cut-off lost ~5e-3 of this FD."""
    rng = np.random.default_rng(0)
    d, n = 1024, 500
    scales = np.logspace(0, -5, d)  # steep spectrum: standard deviations 1 .. 1e-5
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    f1 = (rng.normal(size=(n, d)) * scales) @ q
    f2 = f1 + 1e-2 * (rng.normal(size=(n, d)) * scales) @ q  # a nearby set: FD is a small difference of traces
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N <= D warns
        fd = fd_from_features(f1, f2)
    ref = _fd_referee(f1, f2)
    assert ref > 0 and fd == pytest.approx(ref, rel=1e-7), (fd, ref)


def test_feature_stats_values_and_no_warning_when_enough_samples():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(50, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x.T))
    assert mu.dtype == cov.dtype == np.float64 and cov.shape == (3, 3)


def test_fd_bad_inputs():
    x = np.random.default_rng(14).normal(size=(20, 4))
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        fd_from_features(x, x_nan)
    with pytest.raises(DataError, match="at least 2 samples"):
        feature_stats(x[:1])
    with pytest.raises(DataError, match="dimensions differ"):
        fd_from_features(x, x[:, :3])
    with pytest.raises(DataError, match="semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(DataError, match="symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(DataError, match="2×2"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_fd_ranks_noise_levels():
    """Degrading images with more noise gives a larger FD to an independent clean set."""
    ref = structured_images(150, seed=20)
    clean = structured_images(150, seed=21)
    rng = np.random.default_rng(22)

    def feats(imgs):  # 28×28 -> 7×7 block means, flattened: a cheap but meaningful feature
        return imgs.reshape(len(imgs), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(imgs), -1)

    fds = [
        fd_from_features(feats(ref), feats(np.clip(clean + rng.normal(0, s, clean.shape), 0, 1)))
        for s in (0.0, 0.3, 0.6, 1.0)  # clean, then three noise levels
    ]
    assert all(lo < hi for lo, hi in itertools.pairwise(fds)), fds


# ---------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_identical_sets():
    x = np.random.default_rng(30).normal(size=(300, 5))
    assert precision_recall(x, x, k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_far_away_fake():
    rng = np.random.default_rng(31)
    real, fake = rng.normal(size=(200, 4)), rng.normal(size=(150, 4)) + 50.0
    assert precision_recall(real, fake) == (0.0, 0.0)


@pytest.mark.parametrize("k, want", [(1, 2 / 5), (2, 3 / 5), (3, 4 / 5)])
def test_precision_recall_hand_computed_radii(k, want):
    """Reals at 0..9: the k-th neighbour (self excluded) is 1 away inside, k away at the ends."""
    real = np.arange(10.0)[:, None]
    fake = np.array([4.5, 10.0, 10.5, 11.5, 20.0])[:, None]  # 10.0 lies exactly on the k=1 ball edge
    p, r = precision_recall(real, fake, k=k)
    assert p == pytest.approx(want)
    assert r == 1.0  # 4.5's ball (radius >= 6) covers every real


def test_precision_recall_mode_collapse():
    rng = np.random.default_rng(32)
    centres = np.array([[-8.0, 0, 0], [8.0, 0, 0]])
    real = np.concatenate([rng.normal(size=(300, 3)) + centres[0], rng.normal(size=(300, 3)) + centres[1]])
    fake = rng.normal(size=(300, 3)) + centres[0]  # only the first mode
    p, r = precision_recall(real, fake, k=3, batch_size=100)
    assert p > 0.9
    assert 0.35 < r < 0.6


def test_precision_recall_batch_size_invariant():
    rng = np.random.default_rng(33)
    real, fake = rng.normal(size=(120, 6)), rng.normal(size=(90, 6)) * 1.3 + 0.3
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake, batch_size=1000)


def test_precision_recall_too_few_samples():
    x = np.zeros((10, 2))
    with pytest.raises(DataError, match="at least 4 samples"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(DataError, match="k must be"):
        precision_recall(x, x, k=0)


# ---------------------------------------------------------------------------------------------
# Accuracy


def test_classification_accuracy():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    assert classification_accuracy(logits, labels) == 0.5
    assert classification_accuracy(np.array([0, 1, 1, 2]), labels) == 1.0
    with pytest.raises(DataError, match="length"):
        classification_accuracy(logits, labels[:3])
    with pytest.raises(DataError, match="whole numbers"):
        classification_accuracy(np.array([0.5, 1, 1, 2]), labels)


# ---------------------------------------------------------------------------------------------
# Image validation


def test_check_images_converts_and_shapes():
    u8 = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # 1×2×2
    out = check_images(u8, "samples")
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    f = np.random.default_rng(40).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(check_images(f, "x"), f)


@pytest.mark.parametrize(
    "x, word",
    [
        (np.zeros((2, 8, 8), dtype=np.int32), "int32"),
        (np.full((2, 8, 8), 1.5), r"\[0, 1\]"),
        (np.full((2, 8, 8), -0.5), r"\(x \+ 1\) / 2"),
        (np.zeros((8, 8)), "3-D or 4-D"),
        (np.zeros((2, 1, 8, 8, 1)), "5-D"),
        (np.zeros((2, 3, 8, 8)), "channels-first"),
        (np.zeros((0, 8, 8)), "empty"),
        (np.array([[[0.1, np.nan]]]), "NaN"),
    ],
)
def test_check_images_rejects(x, word):
    with pytest.raises(DataError, match=word) as info:
        check_images(x, "generated samples")
    assert "generated samples" in str(info.value) and str(x.dtype) in str(info.value)


def test_mismatched_sizes():
    a, b = np.zeros((2, 8, 8)), np.zeros((2, 8, 10))
    with pytest.raises(DataError, match=r"8×8×1 .*8×10×1"):
        check_same_size(a, b)
    check_same_size(np.zeros((2, 8, 8)), np.zeros((5, 8, 8, 1)))  # N×H×W is C = 1
    with pytest.raises(DataError, match="differ"):
        psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 1)))
    with pytest.raises(DataError, match="pair image for image"):
        ssim(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
