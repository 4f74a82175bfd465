"""Text-to-image evaluation on the emoji set: FD, precision/recall, category accuracy, R-precision.

R-precision follows AttnGAN (Xu et al. 2018): for each image, its true caption and 99 captions of other
emoji (different texts, drawn at random from the same caption pool) are ranked by the contrastive pair's
cosine similarity; the score is the fraction of images whose true caption ranks first (R = 1), averaged
over ``rounds`` draws. Chance is 1/100.
"""

from __future__ import annotations

import numpy as np


def r_precision(image_emb: np.ndarray, text_emb: np.ndarray, captions, *, candidates: int = 100,
                rounds: int = 5, seed: int = 0) -> tuple[float, float, int]:
    """(mean, std over rounds, candidates used) of top-1 retrieval of image i's caption i among
    ``candidates`` - 1 random captions whose text differs from it. Rows of both embeddings are L2-normalised.

    ``candidates`` shrinks to the number of distinct captions when the pool is smaller (reported).
    """
    captions = list(captions)
    n = len(captions)
    if image_emb.shape[0] != n or text_emb.shape[0] != n:
        raise ValueError(f"{image_emb.shape[0]} images and {text_emb.shape[0]} captions for {n} texts")
    distinct, inverse = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
    k = min(candidates, len(distinct))
    if k < 2:
        raise ValueError("R-precision needs at least 2 distinct captions")
    first = np.array([np.flatnonzero(inverse == j)[0] for j in range(len(distinct))])
    pool = text_emb[first]  # one embedding per distinct caption
    sims = image_emb @ pool.T  # N×D_distinct
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(rounds):
        hits = 0
        for i in range(n):
            others = np.delete(np.arange(len(distinct)), inverse[i])
            pick = rng.choice(others, size=k - 1, replace=False)
            hits += sims[i, inverse[i]] > sims[i, pick].max()
        scores.append(hits / n)
    return float(np.mean(scores)), float(np.std(scores)), k
