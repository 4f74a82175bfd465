"""Text-to-image evaluation on the emoji set: FD, precision/recall, category accuracy, R-precision.

Each split ("train" captions, "heldout" captions) is scored on its own. Its real images are divided at
random into two disjoint halves A and B of ``n`` images each. The generator draws one image for each
caption of A, and every metric then has a real-vs-real floor computed the same way:

* FD and k-NN precision/recall in the emoji classifier's 128-d features: generated(A) against real B,
  next to real A against real B (the floor: what a perfect generator would score with this many images);
* category accuracy: the classifier's category for each generated image against its caption's category,
  next to the classifier's accuracy on the real images of A;
* R-precision, as in AttnGAN (Xu et al. 2018): each image's true caption and 99 other captions of the
  split (different texts, drawn at random) are ranked by the contrastive pair's cosine similarity; the
  score is the fraction ranked first (R = 1), averaged over ``rounds`` draws (chance: 1/100); next to the
  same score for the real images of A.

The judges (:class:`EmojiJudges`) are small networks trained on the training split only and shipped in
``assets/`` (``scripts/train_emoji_eval_models.py``); their accuracy on held-out emoji bounds what a
generator can score.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from latentdiff.errors import DataError, ModelError

CLASSIFIER_ASSET = "emoji_classifier.safetensors"

CLIP_ASSET = "emoji_clip.safetensors"


def r_precision(image_emb: np.ndarray, true_index: np.ndarray, pool_emb: np.ndarray, *, candidates: int = 100,
                rounds: int = 5, seed: int = 0) -> tuple[float, float, int]:
    """(mean, std over rounds, candidates used): how often image i's caption ``pool[true_index[i]]`` outranks
    ``candidates`` - 1 others drawn at random from the rest of the pool. Embeddings are L2-normalised rows;
    the pool holds distinct captions. ``candidates`` shrinks to the pool's size when the pool is smaller."""
    image_emb, pool_emb = np.asarray(image_emb, np.float64), np.asarray(pool_emb, np.float64)
    true_index = np.asarray(true_index, np.int64)
    if len(true_index) != len(image_emb) or image_emb.shape[1:] != pool_emb.shape[1:]:
        raise DataError(f"r_precision: {len(image_emb)} images, {len(true_index)} true captions, "
                        f"embedding sizes {image_emb.shape[1:]} and {pool_emb.shape[1:]}")
    k = min(candidates, len(pool_emb))
    if k < 2:
        raise DataError("R-precision needs at least 2 distinct captions")
    sims = image_emb @ pool_emb.T  # N×P
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(rounds):
        hits = 0
        for i, t in enumerate(true_index):
            others = rng.choice(len(pool_emb) - 1, size=k - 1, replace=False)
            others += others >= t  # skip the true caption
            hits += sims[i, t] > sims[i, others].max()
        scores.append(hits / len(true_index))
    return float(np.mean(scores)), float(np.std(scores)), k


class EmojiJudges:
    """The shipped emoji classifier (features, categories) and contrastive pair (R-precision)."""

    def __init__(self, classifier, classifier_meta: dict, clip, clip_meta: dict):
        self.classifier, self.classifier_meta = classifier.eval(), classifier_meta
        self.clip, self.clip_meta = clip.eval(), clip_meta

    @classmethod
    def load(cls, classifier_path: str | Path | None = None, clip_path: str | Path | None = None) -> EmojiJudges:
        from latentdiff.evaluation.emoji_nets import EMOJI_EVAL_ARCH_VERSION, EmojiCLIP, EmojiClassifier
        from latentdiff.evaluation.features import _load_into
        from latentdiff.utils.state import load_state

        nets = []
        for path, asset, kind in ((classifier_path, CLASSIFIER_ASSET, "emoji-classifier"),
                                  (clip_path, CLIP_ASSET, "emoji-clip")):
            with resources.as_file(resources.files("latentdiff") / "assets" / asset) as default:
                path = Path(path or default).expanduser()
                tensors, meta = load_state(path)
            if meta.get("kind") != kind or meta.get("architecture_version") != EMOJI_EVAL_ARCH_VERSION:
                raise ModelError(f"{path} is not a version-{EMOJI_EVAL_ARCH_VERSION} {kind} file; retrain it with "
                                 "scripts/train_emoji_eval_models.py")
            net = (EmojiClassifier(len(meta["categories"]), len(meta["subcategories"])) if kind == "emoji-classifier"
                   else EmojiCLIP(len(meta["vocab"])))
            _load_into(net, tensors, path)
            nets += [net, meta]
        return cls(*nets)

    def _run(self, fn, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        import torch

        from latentdiff.evaluation.emoji_train import to_input

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"the emoji judges take uint8 N×H×W×3 images, got {images.dtype} {images.shape}")
        with torch.no_grad():
            return torch.cat([fn(to_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
                             ).float().numpy()

    def features(self, images) -> np.ndarray:
        return self._run(self.classifier.features, images)

    def categories(self, images) -> np.ndarray:
        return self._run(lambda x: self.classifier(x)[0], images).argmax(1).astype(np.int64)

    def image_embeddings(self, images) -> np.ndarray:
        return self._run(self.clip.embed_images, images)

    def text_embeddings(self, captions) -> np.ndarray:
        import torch

        from latentdiff.evaluation.emoji_nets import tokenize

        ids, mask = tokenize(list(captions), self.clip_meta["vocab"])
        with torch.no_grad():
            return self.clip.embed_text(ids, mask).numpy()


def _halves(n_images: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random index sets of min(n, n_images // 2) each."""
    m = min(n, n_images // 2)
    if m < 4:
        raise DataError(f"{n_images} images are too few to score (each half needs at least 4)")
    perm = np.random.default_rng(seed).permutation(n_images)
    return np.sort(perm[:m]), np.sort(perm[m:2 * m])


def _distribution(fake: np.ndarray, real_a: np.ndarray, real_b: np.ndarray) -> dict:
    from latentdiff.evaluation.metrics import fd_from_features, precision_recall

    with warnings.catch_warnings():  # fewer images than feature dimensions: biased, and the floor shows by how much
        warnings.simplefilter("ignore")
        fd, fd_floor = fd_from_features(fake, real_b), fd_from_features(real_a, real_b)
    precision, recall = precision_recall(real_b, fake)
    p_floor, r_floor = precision_recall(real_b, real_a)
    return {"fd": fd, "fd_floor": fd_floor, "precision": precision, "precision_floor": p_floor,
            "recall": recall, "recall_floor": r_floor}


def score_split(generate: Callable[[list[str]], np.ndarray], data, judges: EmojiJudges, *, n: int = 200,
                seed: int = 0, rounds: int = 5) -> dict:
    """The metrics of one split's captions (``data``: :class:`~latentdiff.data.emoji.EmojiData`)."""
    a, b = _halves(len(data), n, seed)
    captions = [data.captions[i] for i in a]
    fake = np.asarray(generate(captions))
    if fake.shape != (len(a), *data.images.shape[1:]) or fake.dtype != np.uint8:
        raise DataError(f"the generator returned {fake.dtype} {fake.shape} for {len(a)} captions; expected uint8 "
                        f"{(len(a), *data.images.shape[1:])}")
    real_a, real_b = data.images[a], data.images[b]
    out = {"n": len(a), **_distribution(judges.features(fake), judges.features(real_a), judges.features(real_b))}
    labels = data.labels[a]
    out["category_accuracy"] = float((judges.categories(fake) == labels).mean())
    out["category_accuracy_floor"] = float((judges.categories(real_a) == labels).mean())
    pool = sorted(set(data.captions))
    true_index = np.array([pool.index(c) for c in captions])
    pool_emb = judges.text_embeddings(pool)
    for name, images in (("r_precision", fake), ("r_precision_floor", real_a)):
        mean, std, k = r_precision(judges.image_embeddings(images), true_index, pool_emb, rounds=rounds, seed=seed)
        out[name], out[f"{name}_std"], out["r_precision_candidates"] = mean, std, k
    return out


def evaluate_text_to_image(generate: Callable[[list[str]], np.ndarray], *, n: int = 200, seed: int = 0,
                           splits: tuple[str, ...] = ("train", "heldout"), root=None, size: int = 64,
                           judges: EmojiJudges | None = None, rounds: int = 5, bundled: bool | None = None) -> dict:
    """Score ``generate`` (captions -> uint8 N×size×size×3) on each split's captions; see the module doc.

    The data: the downloaded emoji set (``root``, see :func:`~latentdiff.data.emoji.load_emoji`), else the
    bundled subset (``bundled=True`` forces it, ``False`` requires the full set)."""
    from latentdiff.data.emoji import load_emoji

    judges = judges or EmojiJudges.load()
    results = {}
    for split in splits:
        data = load_emoji(split, root, size, bundled=bundled)
        results[split] = {"source": data.source, **score_split(generate, data, judges, n=n, seed=seed,
                                                               rounds=rounds)}
    return results


TABLE_ROWS = (("FD", "fd"), ("precision", "precision"), ("recall", "recall"),
              ("category accuracy", "category_accuracy"), ("R-precision", "r_precision"))


def format_table(results: dict) -> str:
    """A Markdown table: one row per metric, value and real-data floor for each split."""
    splits = list(results)
    head = "| metric | " + " | ".join(f"{s} ({results[s]['n']}) | {s} real" for s in splits) + " |"
    rule = "|---|" + "---:|---:|" * len(splits)
    rows = [f"| {label} | " + " | ".join(f"{results[s][key]:.3f} | {results[s][key + '_floor']:.3f}"
                                           for s in splits) + " |" for label, key in TABLE_ROWS]
    return "\n".join([head, rule, *rows])
