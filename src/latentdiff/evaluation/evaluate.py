"""Evaluation: Fréchet distance beside its real-vs-real floor, k-NN precision/recall, class accuracy, PSNR/SSIM.

Every distribution metric is computed in the feature space of a named extractor (see
:mod:`latentdiff.features`); numbers from different extractors are not comparable, so each
result names its extractor. "FD" is FID only with the standard Inception weights.

The floor answers "how small can FD be with this many images?": the FD between an equally sized
set of *real* training images and the same test split. A model whose FD is near the floor is as
close to the data as a finite real sample is. Only an unpaired FD has a floor: the FD between
reconstructions and their own originals shares the originals' sampling noise and goes to 0.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from latentdiff.errors import ConfigError, DataError

# torch, scipy and the modules built on them are imported inside the functions that use them:
# `register` runs whenever the `latentdiff` parser is built, and `latentdiff --help` should not
# wait two seconds for torch (cli.py defers its heavy imports for the same reason).
if TYPE_CHECKING:
    from latentdiff.data import ImageData
    from latentdiff.evaluation.features import Extractor


__all__ = ["EXTRACTOR_NAMES", "REFERENCES", "evaluate_autoencoder", "evaluate_samples", "load_samples",
           "reconstruct"]


REFERENCES = ("fashion-mnist", "bundled", "spoken-digits")


# the keys of features.EXTRACTORS (a test checks)
EXTRACTOR_NAMES = ("fashion-mnist-classifier", "inception", "emoji-classifier", "spoken-digit-classifier")


DEFAULT_EXTRACTOR = "fashion-mnist-classifier"


# Per-process caches: reference data, extractors (building Inception takes seconds) and reference
# features/statistics (extracting 10k images through Inception takes minutes on a CPU).
_DATA: dict[tuple, ImageData] = {}


_EXTRACTOR_CACHE: dict[tuple, Extractor] = {}


_FEATURES: dict[tuple, np.ndarray] = {}


_STATS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


_ACCURACY: dict[tuple, float] = {}


def _reference_data(reference: str, split: str, data_dir) -> ImageData:
    if reference not in REFERENCES:
        raise ConfigError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    key = (reference, split, str(data_dir))
    if key not in _DATA:
        from latentdiff.data import load_dataset

        _DATA[key] = load_dataset(reference, split, data_dir=data_dir)
    return _DATA[key]


def _extractor(extractor: str | Extractor, weights, device) -> Extractor:
    from latentdiff.evaluation.features import Extractor, get_extractor

    if isinstance(extractor, Extractor):
        return extractor
    key = (extractor, str(weights), str(device))
    if key not in _EXTRACTOR_CACHE:
        _EXTRACTOR_CACHE[key] = get_extractor(extractor, weights=weights, device=device)
    return _EXTRACTOR_CACHE[key]


def _subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """n sorted indices out of n_total, fixed by seed (all of them, in order, when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def _reference_features(ext: Extractor, reference: str, split: str, data_dir, idx: np.ndarray | None,
                        batch_size: int) -> tuple[np.ndarray, tuple]:
    """Features of (a subset of) a reference split, cached per process; also returns the cache key."""
    sel = None if idx is None else hashlib.sha256(np.ascontiguousarray(idx, np.int64).tobytes()).hexdigest()
    key = (ext.cache_key(), reference, split, str(data_dir), sel)
    if key not in _FEATURES:
        images = _reference_data(reference, split, data_dir).images
        _FEATURES[key] = ext.features(images if idx is None else images[idx], batch_size=batch_size)
    return _FEATURES[key], key


def _stats(features: np.ndarray, key: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    from latentdiff.evaluation.metrics import feature_stats

    if key is None:
        return feature_stats(features)
    if key not in _STATS:
        _STATS[key] = feature_stats(features)
    return _STATS[key]


def _shape_text(shape: tuple) -> str:
    return "×".join(map(str, shape if len(shape) == 3 else (*shape, 1)))


def _check_same_size(shape: tuple, ref: ImageData, what: str) -> None:
    """`shape`: one image's H×W or H×W×C; the reference's images must have the same H×W×C."""
    a, b = tuple(shape), tuple(ref.images.shape[1:])
    if (a + (1,) if len(a) == 2 else a) != b:
        raise DataError(f"{what} are {_shape_text(a)} (H×W×C) but the reference images ({ref.source}) are "
                        f"{_shape_text(b)}; FD and precision/recall compare sets of the same size")


def _check_count(n: int, ext: Extractor | type[Extractor], what: str) -> None:  # ext: anything with .dim, .name
    need = ext.dim + 1
    if n < need:
        raise DataError(f"{n} {what} are too few: the Fréchet distance with {ext.dim}-d {ext.name} features needs "
                        f"at least {need} images for a full-rank covariance (10000 gives comparable numbers)")


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise DataError(f"labels must be a 1-D array with one entry per image ({n}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must be class indices in 0..{num_classes - 1}, got values in "
                        f"{y.min()}..{y.max()}")
    return y.astype(np.int64)


def _as_images(images, what: str) -> np.ndarray:
    """Validate (dtype, range, NaN, layout) and return the array unchanged (uint8 or float in [0, 1])."""
    from latentdiff.evaluation.metrics import check_images

    check_images(images, what)
    return images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)  # a torch tensor?


def _extractor_spec(extractor: str | Extractor):
    """The extractor's class (for a name; nothing is built) or the object itself: anything with .dim and .name."""
    if isinstance(extractor, str):
        from latentdiff.evaluation.features import EXTRACTORS

        if extractor not in EXTRACTORS:
            raise ConfigError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
        return EXTRACTORS[extractor]
    return extractor


def reference_images(reference: str, split: str, data_dir, n: int, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The first `n` uint8 images (N×H×W×C) of a reference split, checked against a model's (C, H, W)."""
    data = _reference_data(reference, split, data_dir)
    c, h, w = image_shape
    if data.images.shape[1:] != (h, w, c):
        raise DataError(f"the {reference} {split} images are {'×'.join(map(str, data.images.shape[1:]))} (H×W×C) "
                        f"but the model's are {h}×{w}×{c}")
    if n > len(data.images):
        raise DataError(f"--n {n} but the {reference} {split} split holds only {len(data.images)} images")
    return data.images[:n]


def preflight(n: int, extractor: str | Extractor, reference: str, data_dir, image_shape: tuple) -> None:
    """Every check that needs no features, before minutes are spent sampling or extracting.

    ``image_shape``: one image's H×W or H×W×C. Refuses too few images for a full-rank covariance,
    a reference test split too small for the same reason, and images of another size than the reference's.
    """
    spec = _extractor_spec(extractor)
    _check_count(n, spec, "sample images")
    test = _reference_data(reference, "test", data_dir)
    _check_count(len(test), spec, f"reference images ({test.source})")
    _check_same_size(tuple(image_shape), test, "sample images")


def _floor(ext: Extractor, reference: str, data_dir, n: int, seed: int, batch_size: int, stats_ref) -> dict:
    """FD of n real training images (a fixed-seed subset) vs the reference; a note when the split has fewer."""
    from latentdiff.evaluation.metrics import frechet_distance

    train = _reference_data(reference, "train", data_dir)
    idx = _subset(len(train), n, seed)
    _check_count(len(idx), ext, f"training images for the floor ({train.source})")
    floor, key = _reference_features(ext, reference, "train", data_dir, idx, batch_size)
    out = {"fd_floor": frechet_distance(*_stats(floor, key), *stats_ref), "n_floor": len(idx)}
    if len(idx) < n:  # FD is biased upwards at small N, so this floor sits higher than a true one would
        note = (f"the floor uses all {len(idx)} training images of {train.source}, fewer than the {n} samples, "
                "so it is not directly comparable (FD grows as N shrinks)")
        out["notes"] = [note]
    return out


def _real_accuracy(clf, reference: str, data_dir, batch_size: int) -> float | None:
    """The classifier's accuracy on the reference's labelled test images (what real data scores), cached."""
    from latentdiff.evaluation.metrics import classification_accuracy

    test = _reference_data(reference, "test", data_dir)
    if test.labels is None:
        return None
    key = ("accuracy", clf.cache_key(), reference, str(data_dir))
    if key not in _ACCURACY:
        _ACCURACY[key] = classification_accuracy(clf.predict(test.images, batch_size=batch_size), test.labels)
    return _ACCURACY[key]


def evaluate_samples(images, labels=None, *, reference: str = "fashion-mnist",
                     extractor: str | Extractor = DEFAULT_EXTRACTOR, weights: str | None = None, k: int = 3,
                     device="cpu", batch_size: int = 256, data_dir=None, seed: int = 0) -> dict:
    """Score generated images against the test split of ``reference``.

    Returns ``fd`` (n samples vs the whole test split), ``fd_floor`` (n real training images — a
    fixed-seed random subset — vs the same test split; ``n_floor`` of them, with a ``notes`` entry when
    the training split has fewer than n), ``precision``/``recall`` (k-NN, on equal-size sets of
    min(n, test size) images, fixed-seed subsets), ``n``, ``extractor``, ``reference``, and when labels
    are given ``cond_acc`` (the Fashion-MNIST classifier's accuracy against ``labels``) beside
    ``cond_acc_real`` (its accuracy on the reference's real test images).
    """
    from latentdiff.evaluation.metrics import classification_accuracy, frechet_distance, precision_recall

    images = _as_images(images, "samples")
    n = len(images)
    ext = _extractor(extractor, weights, device)
    preflight(n, ext, reference, data_dir, images.shape[1:])  # before any feature is extracted
    ext.check_size(images)
    if int(k) != k or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    test = _reference_data(reference, "test", data_dir)
    if labels is not None:
        labels = _check_labels(labels, n, len(test.class_names) or 10)

    fake = ext.features(images, batch_size=batch_size)
    real, real_key = _reference_features(ext, reference, "test", data_dir, None, batch_size)
    stats_ref = _stats(real, real_key)
    fd = frechet_distance(*_stats(fake), *stats_ref)
    floor = _floor(ext, reference, data_dir, n, seed, batch_size, stats_ref)

    m = min(n, len(real))  # precision/recall depend on set sizes: compare equal-size sets
    precision, recall = precision_recall(real[_subset(len(real), m, seed + 1)], fake[_subset(n, m, seed + 2)], k=k)

    result = {"n": n, "extractor": ext.name, "reference": f"{reference} (test)", "n_reference": len(real),
              "fd": fd, **floor, "precision": precision, "recall": recall, "k": int(k), "n_precision_recall": m}
    if labels is not None:
        clf = ext if hasattr(ext, "logits") else _extractor("fashion-mnist-classifier", None, device)
        clf.check_size(images)
        result["cond_acc"] = classification_accuracy(clf.predict(images, batch_size=batch_size), labels)
        result["cond_acc_real"] = _real_accuracy(clf, reference, data_dir, batch_size)
    if ext.name == "spoken-digit-classifier":  # the SC09 protocol also reports IS and modified IS
        from latentdiff.evaluation.audio_features import inception_score

        result["is"], result["mis"] = inception_score(ext.logits(images, batch_size=batch_size))
        result["is_real"], result["mis_real"] = inception_score(ext.logits(test.images, batch_size=batch_size))
    if "notes" in result:
        result = {**result, "notes": result.pop("notes")}  # last, after the numbers
    return result


def reconstruct(autoencoder, images: np.ndarray, device, batch_size: int = 256) -> np.ndarray:
    """uint8 N×H×W×C images -> their reconstructions through the posterior mean, uint8 N×H×W×C."""
    import torch

    from latentdiff.utils.images import to_tensor, to_uint8

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i:i + batch_size]).to(device)  # B×C×H×W in [-1, 1]
            out.append(to_uint8(autoencoder.decode(autoencoder.encode(x).mean)))
    return np.concatenate(out)


def evaluate_autoencoder(model, *, n: int = 2000, reference: str = "fashion-mnist",
                         extractor: str | Extractor = DEFAULT_EXTRACTOR, weights: str | None = None,
                         device="cpu", batch_size: int = 256, data_dir=None, seed: int = 0) -> dict:
    """Reconstruct the first ``n`` held-out (test) images A and score the reconstructions rec(A).

    Returns mean ``psnr`` (dB) and ``ssim``, and two Fréchet distances:

    * ``fd``: rec(A) vs A itself, paired (rFID in the latent-diffusion papers). It shares A's sampling
      noise, so a perfect codec scores 0 and no real-vs-real floor applies to it;
    * ``fd_unpaired``: rec(A) vs B, n real training images (a fixed-seed subset), next to its floor
      ``fd_floor`` = FD(A, B); a perfect codec scores exactly the floor.

    ``model`` is a :class:`~latentdiff.pipeline.LatentDiffusion`, a model directory or ``pretrained:NAME``.
    """
    from latentdiff.evaluation.metrics import frechet_distance, psnr, ssim
    from latentdiff.pipeline import LatentDiffusion

    pipe = model if isinstance(model, LatentDiffusion) else LatentDiffusion.load(model, device)
    ext = _extractor(extractor, weights, device)
    test = _reference_data(reference, "test", data_dir)
    c, h, w = pipe.image_shape
    _check_same_size((h, w, c), test, "the model's images")
    n = min(int(n), len(test))
    _check_count(n, ext, "held-out images")
    originals = test.images[:n]
    rec = reconstruct(pipe.autoencoder, originals, pipe.device, batch_size)
    stats_rec = _stats(ext.features(rec, batch_size=batch_size))
    f_orig, orig_key = _reference_features(ext, reference, "test", data_dir, np.arange(n), batch_size)
    stats_orig = _stats(f_orig, orig_key)
    train = _reference_data(reference, "train", data_dir)
    b_idx = _subset(len(train), n, seed)
    _check_count(len(b_idx), ext, f"training images ({train.source})")
    f_b, b_key = _reference_features(ext, reference, "train", data_dir, b_idx, batch_size)
    stats_b = _stats(f_b, b_key)
    return {"n": n, "extractor": ext.name, "reference": f"{reference} (test)",
            "psnr": float(np.mean(psnr(originals, rec))),  # inf only if some reconstruction is exact
            "ssim": float(np.mean(ssim(originals, rec))),
            "fd": frechet_distance(*stats_rec, *stats_orig),
            "fd_unpaired": frechet_distance(*stats_rec, *stats_b),
            "fd_floor": frechet_distance(*stats_orig, *stats_b), "n_floor": len(b_idx)}


MAX_SAMPLE_BYTES = 1 << 32  # 4 GiB of uncompressed sample images (1M 28×28 float32 images is 3 GiB)


def _member_header(npz, key: str, path: Path) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one .npz member from its header, before its (possibly huge) data is decompressed."""
    from numpy.lib import format as npy

    try:
        with npz.zip.open(f"{key}.npy") as f:
            version = npy.read_magic(f)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(f)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read `{key}` in samples file {path}: {e}") from None
    if dtype.hasobject:
        raise DataError(f"`{key}` in {path} holds Python objects (pickled data), which latentdiff never loads; "
                        "save plain numeric arrays")
    if math.prod(shape) * dtype.itemsize > MAX_SAMPLE_BYTES:
        raise DataError(f"`{key}` in {path} is {'×'.join(map(str, shape))} {dtype}, larger than "
                        f"{MAX_SAMPLE_BYTES >> 30} GiB; score a subset")
    return shape, dtype


def load_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` (and optional ``labels``) from an .npz written by ``latentdiff sample --out FILE.npz``.

    Never unpickles, and checks each array's shape and dtype from its header before decompressing it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read samples file {path}: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single array, not an .npz archive; save samples with "
                        "np.savez(FILE, images=uint8 N×H×W[×C], labels=...)")
    with npz:
        if "images" not in npz.files:
            raise DataError(f"{path} has no `images` array (it holds: {', '.join(npz.files) or 'nothing'}); "
                            "save samples as np.savez(FILE, images=uint8 N×H×W[×C], labels=...)")
        keys = [k for k in ("images", "labels") if k in npz.files]
        for key in keys:
            _member_header(npz, key, path)
        try:
            images, labels = (npz[k] for k in keys) if len(keys) == 2 else (npz["images"], None)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated members
            raise DataError(f"cannot read samples file {path}: {e}") from None
    _as_images(images, f"`images` in {path}")  # dtype, layout, range, NaN: before any model or extractor loads
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"`labels` in {path} must be a 1-D array with one entry per image ({len(images)}), "
                        f"got shape {labels.shape}")
    return images, labels
