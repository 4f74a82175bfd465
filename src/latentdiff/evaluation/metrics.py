"""Image and distribution metrics: PSNR, SSIM, Fréchet distance, k-NN precision/recall, accuracy.

Image conventions (every image metric goes through :func:`check_images`):

* a batch is ``N×H×W`` (grayscale) or ``N×H×W×C`` (channels last, C <= 4);
* ``uint8`` batches are read as ``x / 255``; floating batches must already lie in ``[0, 1]``
  (map ``[-1, 1]`` model outputs with ``(x + 1) / 2`` first). Other dtypes are refused, because
  guessing the range of ``int32`` or ``uint16`` data silently gives wrong numbers;
* numpy arrays and torch tensors are both accepted.

Because every image is in ``[0, 1]`` after that conversion, ``data_range=1.0`` is right for
uint8 and float inputs alike; ``data_range`` exists only to reproduce a foreign convention.

Feature metrics take ``N×D`` arrays (any real dtype, computed in float64 / torch float64).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from latentdiff.errors import DataError

__all__ = [
    "check_images",
    "check_same_size",
    "classification_accuracy",
    "fd_from_features",
    "feature_stats",
    "frechet_distance",
    "precision_recall",
    "psnr",
    "ssim",
]

# Float inputs may overshoot [0, 1] by this much (e.g. after a float32 (x + 1) / 2); they are clipped.
_RANGE_SLACK = 1e-6


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise DataError(f"{name}: cannot be read as an array ({err})") from err


def _unit_float(x, name: str, dtype) -> np.ndarray:
    """Validate an image batch and return it as N×H×W×C in [0, 1] with the given float dtype."""
    arr = _to_numpy(x, name)
    desc = f"{name} (shape {tuple(arr.shape)}, dtype {arr.dtype})"
    if arr.ndim not in (3, 4):
        raise DataError(
            f"{desc}: expected a batch of images N×H×W or N×H×W×C (3-D or 4-D), got {arr.ndim}-D"
            + ("; add a batch axis with x[None]" if arr.ndim == 2 else "")
        )
    if arr.size == 0:
        raise DataError(f"{desc}: the image batch is empty")
    if arr.ndim == 4 and arr.shape[-1] > 4:
        hint = "; it looks channels-first, transpose with x.transpose(0, 2, 3, 1)" if arr.shape[1] <= 4 else ""
        raise DataError(f"{desc}: expected channels last (N×H×W×C with C <= 4), got C={arr.shape[-1]}{hint}")
    if arr.dtype == np.uint8:
        out = arr.astype(dtype) / dtype(255)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{desc}: contains {bad} NaN/inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            hint = "; for [-1, 1] data use (x + 1) / 2" if lo >= -1 - _RANGE_SLACK else ""
            raise DataError(
                f"{desc}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                f" (uint8 images in 0..255 are also accepted){hint}"
            )
        out = np.clip(arr.astype(dtype), 0, 1)
    else:
        raise DataError(
            f"{desc}: unsupported dtype {arr.dtype}; pass uint8 in 0..255 or float in [0, 1]"
        )
    if out.ndim == 3:
        out = out[..., None]  # N×H×W -> N×H×W×1
    return out


def check_images(x, name: str) -> np.ndarray:
    """Validate an image batch (uint8 or float in [0, 1], 3-D or 4-D); return N×H×W×C float32 in [0, 1]."""
    return _unit_float(x, name, np.float32)


def _image_shape(x) -> tuple:
    shape = tuple(np.shape(x) if not isinstance(x, torch.Tensor) else x.shape)
    return shape[1:] + (1,) if len(shape) == 3 else shape[1:]


def check_same_size(a, b) -> None:
    """Raise DataError unless two image batches have the same H×W×C (N×H×W counts as C = 1)."""
    sa, sb = _image_shape(a), _image_shape(b)
    if sa != sb:
        raise DataError(
            f"image sizes differ: {'×'.join(map(str, sa))} (H×W×C) vs {'×'.join(map(str, sb))};"
            " resize or convert one set so both have the same size and channels"
        )


def _paired(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _unit_float(a, f"{what} a", np.float64), _unit_float(b, f"{what} b", np.float64)
    check_same_size(x, y)
    if len(x) != len(y):
        raise DataError(f"{what}: batches must pair image for image, got {len(x)} vs {len(y)} images")
    return x, y


def _check_range(data_range: float) -> float:
    r = float(data_range)
    if not np.isfinite(r) or r <= 0:
        raise DataError(f"data_range must be a positive finite number, got {data_range!r}")
    return r


def psnr(a, b, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image in dB, 10·log10(R² / MSE), MSE over all pixels and channels.

    Identical images give ``inf`` (MSE = 0), so average PSNRs with care. Returns float64 shape (N,).
    """
    r = _check_range(data_range)
    x, y = _paired(a, b, "psnr")
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(r * r / mse)


def ssim(a, b, data_range: float = 1.0, win_size: int = 7) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004, eq. 13), matching skimage ``structural_similarity`` defaults.

    Uniform ``win_size``² window, K1 = 0.01, K2 = 0.03, sample (N-1) covariances; the SSIM map is
    averaged only where the window fits inside the image (skimage crops (win_size-1)//2 per border),
    and colour images average the per-channel means (skimage ``channel_axis=-1``). Returns (N,) float64.
    """
    r = _check_range(data_range)
    x, y = _paired(a, b, "ssim")
    if win_size < 3 or win_size % 2 == 0:
        raise DataError(f"ssim: win_size must be an odd integer >= 3, got {win_size}")
    h, w = x.shape[1:3]
    if min(h, w) < win_size:
        raise DataError(f"ssim: images of {h}×{w} are smaller than the {win_size}×{win_size} window")
    # Filter only over H and W; batch and channel axes are independent. The border values depend
    # on the filter's padding mode, but the crop below discards exactly those values.
    size = (1, win_size, win_size, 1)
    mean = lambda z: uniform_filter(z, size=size)
    np_ = win_size * win_size
    cov_norm = np_ / (np_ - 1)  # sample covariance, as skimage use_sample_covariance=True
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    p = (win_size - 1) // 2
    s = s[:, p : h - p, p : w - p, :]  # N×H'×W'×C valid region
    return s.mean(axis=(1, 2)).mean(axis=1)  # channel means, then their average


# ---------------------------------------------------------------------------------------------
# Feature-distribution metrics


def _features(f, name: str, min_n: int = 1) -> np.ndarray:
    arr = _to_numpy(f, name)
    desc = f"{name} (shape {tuple(arr.shape)}, dtype {arr.dtype})"
    if arr.ndim != 2:
        raise DataError(f"{desc}: expected features as an N×D array, got {arr.ndim}-D")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{desc}: features must be real numbers")
    if arr.shape[0] < min_n:
        raise DataError(f"{desc}: need at least {min_n} samples, got {arr.shape[0]}")
    if arr.shape[1] == 0:
        raise DataError(f"{desc}: features have zero dimensions")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{desc}: contains {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D×D) of N×D features, in float64.

    N < 2 is an error. N <= D is allowed with a warning: the covariance is then rank-deficient
    (rank <= N-1), which :func:`frechet_distance` handles, but the estimate is poor.
    """
    f = _features(features, "features", min_n=2)
    n, d = f.shape
    if n <= d:
        warnings.warn(
            f"feature_stats: {n} samples of {d}-dim features; a full-rank covariance needs more than"
            f" {d} samples, so the Fréchet distance will be biased — use more samples",
            stacklevel=2,
        )
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; rounding-negative eigenvalues become 0.

    No tolerance cut-off: small real eigenvalues keep their (relatively large) square roots.
    """
    lam, q = np.linalg.eigh(s)
    return (q * np.sqrt(np.clip(lam, 0.0, None))) @ q.T


def _check_cov(sigma, d: int, name: str) -> np.ndarray:
    s = _to_numpy(sigma, name).astype(np.float64)
    if s.shape != (d, d):
        raise DataError(f"{name}: expected a {d}×{d} covariance to match its mean, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError(f"{name}: covariance contains NaN/inf values")
    scale = max(float(np.abs(s).max()), 1e-300)
    if np.abs(s - s.T).max() > 1e-6 * scale:
        raise DataError(f"{name}: covariance is not symmetric; pass the output of feature_stats")
    s = (s + s.T) / 2
    lam = np.linalg.eigvalsh(s)
    if lam.min() < -1e-6 * max(float(np.abs(lam).max()), 1e-300):
        raise DataError(
            f"{name}: covariance is not positive semi-definite (smallest eigenvalue {lam.min():.3g});"
            " pass the output of feature_stats"
        )
    return s


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1-μ2‖² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½).

    Tr (Σ1 Σ2)^½ is the nuclear norm ‖Σ2^½ Σ1^½‖_* (the sum of its singular values): with
    A = Σ1^½ Σ2^½, A Aᵀ = Σ1^½ Σ2 Σ1^½ has the eigenvalues of Σ1 Σ2, so A's singular values are their
    square roots. The SVD finds small singular values to an absolute accuracy of ε‖A‖, where taking
    square roots of the eigenvalues of Σ1^½ Σ2 Σ1^½ would resolve only ε‖A‖² and lose the many small
    real terms of singular (N <= D) covariances with steep spectra. pytorch-fid instead runs sqrtm on
    the non-symmetric product, adds ε·I when it fails and discards imaginary parts; here no imaginary
    part can arise, and covariances that are not PSD raise DataError instead.
    """
    m1 = _to_numpy(mu1, "mu1").astype(np.float64)
    m2 = _to_numpy(mu2, "mu2").astype(np.float64)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise DataError(f"frechet_distance: means must be 1-D of equal length, got {m1.shape} and {m2.shape}")
    if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
        raise DataError("frechet_distance: means contain NaN/inf values")
    d = m1.shape[0]
    s1, s2 = _check_cov(sigma1, d, "sigma1"), _check_cov(sigma2, d, "sigma2")
    tr_covmean = float(np.linalg.svd(_psd_sqrt(s2) @ _psd_sqrt(s1), compute_uv=False).sum())  # ‖Σ2^½ Σ1^½‖_*
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # a distance: only rounding can make it negative


def fd_from_features(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to two N×D feature sets (FID when features are Inception's)."""
    a, b = _features(f1, "features 1", 2), _features(f2, "features 2", 2)
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ---------------------------------------------------------------------------------------------
# k-NN precision / recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric")


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the row itself is the 0-th)."""
    radii = []
    for i in range(0, len(x), batch_size):
        dist = torch.cdist(x[i : i + batch_size], x)  # B×N
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of query rows inside the union of balls B(ref_j, radii_j)."""
    inside = 0
    for i in range(0, len(query), batch_size):
        dist = torch.cdist(query[i : i + batch_size], ref)  # B×N_ref
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / len(query)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019, eqs. 1–2).

    The real manifold is the union of balls around each real sample with radius the distance to its
    k-th nearest real neighbour; precision is the fraction of fake samples inside it. Recall swaps
    the roles. Distances are in float64, ``batch_size`` rows at a time (memory ~ batch_size × N).
    """
    if int(k) != k or k < 1:
        raise DataError(f"precision_recall: k must be a positive integer, got {k!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise DataError(f"precision_recall: batch_size must be a positive integer, got {batch_size!r}")
    k, batch_size = int(k), int(batch_size)
    real = torch.from_numpy(_features(real_features, "real features", min_n=k + 1))
    fake = torch.from_numpy(_features(fake_features, "fake features", min_n=k + 1))
    if real.shape[1] != fake.shape[1]:
        raise DataError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------


def classification_accuracy(logits_or_preds, labels) -> float:
    """Fraction of correct predictions; takes N×K logits/probabilities (argmax) or N integer predictions."""
    p = _to_numpy(logits_or_preds, "predictions")
    y = _to_numpy(labels, "labels")
    if p.ndim == 2:
        if p.shape[1] == 0 or not np.isfinite(p).all():
            raise DataError(f"predictions: N×K logits must have K >= 1 and be finite, got shape {p.shape}")
        p = p.argmax(axis=1)
    elif p.ndim != 1:
        raise DataError(f"predictions: expected N×K logits or N class indices, got shape {p.shape}")
    for name, v in (("predictions", p), ("labels", y)):
        if v.ndim != 1 or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
            raise DataError(f"{name}: expected a 1-D array of class indices, got shape {v.shape}, dtype {v.dtype}")
        if np.issubdtype(v.dtype, np.floating) and not (np.isfinite(v).all() and (v == np.round(v)).all()):
            raise DataError(f"{name}: class indices must be whole numbers (pass N×K logits for scores)")
    if len(p) != len(y):
        raise DataError(f"predictions and labels differ in length: {len(p)} vs {len(y)}")
    if len(y) == 0:
        raise DataError("classification_accuracy: no samples")
    return float((p.astype(np.int64) == y.astype(np.int64)).mean())
