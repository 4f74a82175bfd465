"""A small skin-tone classifier for emoji images: the default yellow skin or one of the 5 Fitzpatrick tones.

Noto draws every skin-tone variant of an emoji with one flat skin colour per tone (plus a few shading
colours), so a nearest-colour rule is enough: each pixel within ``MAX_DISTANCE`` (RGB, 0-255) of one of the
six skin colours below counts for that tone, and the image gets the tone with the most such pixels, or
``UNCLEAR`` when fewer than ``MIN_FRACTION`` of its pixels match any skin colour (no person, or no
recognisable skin). Deterministic, numpy only.

``SKIN_COLOURS`` was derived once from the full emoji training split (emoji-datasource-google 16.0.0) by
``derive_skin_colours`` below: for the 279 training emoji that have all five single-tone variants, the
pixels where any variant differs from the base emoji, and in each tone's image the most frequent exact
colour among those pixels (25–27% of them; the next most frequent is the hair, which is not tone-specific:
the default and medium tones share it). The nearest two skin colours are 54 apart, so a 24 radius keeps
them disjoint.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from latentdiff.errors import DataError

# Index 0..5: the tone classes; UNCLEAR (6) is the extra "no skin found" bin of the histograms.
TONE_CLASSES: tuple[str, ...] = ("default", "light skin tone", "medium-light skin tone", "medium skin tone",
                                 "medium-dark skin tone", "dark skin tone")
UNCLEAR = len(TONE_CLASSES)
TONE_BINS: tuple[str, ...] = (*TONE_CLASSES, "unclear")

SKIN_COLOURS = np.array([
    (255, 202, 40),   # default (Noto yellow)
    (249, 221, 189),  # light
    (224, 187, 149),  # medium-light
    (186, 141, 104),  # medium
    (165, 108, 67),   # medium-dark
    (112, 83, 74),    # dark
], dtype=np.float32)  # fmt: skip

MAX_DISTANCE = 24.0

MIN_FRACTION = 0.004  # of the image's pixels (16 of 64×64)


def tone_index(tone: str) -> int | None:
    """The class of a data set ``tone`` field: "" -> 0 (default), "medium skin tone" -> 3, a two-person
    variant with one tone twice -> that tone, two different tones -> None (no single class)."""
    parts = {p.strip() for p in tone.split(",")} if tone else {""}
    if len(parts) != 1:
        return None
    part = parts.pop()
    if part == "":
        return 0
    if part not in TONE_CLASSES:
        raise DataError(f"unknown skin tone {tone!r}; expected one of {', '.join(TONE_CLASSES[1:])}")
    return TONE_CLASSES.index(part)


def tone_fractions(tone: str) -> np.ndarray:
    """The data set's ``tone`` field as fractions over TONE_BINS: one tone -> 1 in its bin, a variant showing
    several people with different tones -> an equal share for each."""
    out = np.zeros(len(TONE_BINS))
    parts = [p.strip() for p in tone.split(",")] if tone else [""]
    for p in parts:
        out[tone_index(p)] += 1 / len(parts)
    return out


def skin_pixel_counts(images: np.ndarray, colours: np.ndarray = SKIN_COLOURS,
                      max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """N×6: how many pixels of each image lie within ``max_distance`` of each skin colour (nearest one only)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"the skin-tone classifier takes N×H×W×3 images, got shape {images.shape}")
    px = images.reshape(len(images), -1, 3).astype(np.float32)
    counts = np.zeros((len(images), len(colours)), np.int64)
    for i in range(len(images)):
        d2 = ((px[i, :, None, :] - colours[None]) ** 2).sum(-1)  # P×6
        nearest = d2.argmin(1)
        ok = d2[np.arange(len(nearest)), nearest] <= max_distance ** 2
        counts[i] = np.bincount(nearest[ok], minlength=len(colours))
    return counts


def classify_tones(images: np.ndarray, min_fraction: float = MIN_FRACTION) -> np.ndarray:
    """int64 tone class per image: 0 default, 1..5 light..dark, UNCLEAR when too few skin-coloured pixels."""
    counts = skin_pixel_counts(images)
    if not len(counts):
        return np.zeros(0, np.int64)
    enough = counts.max(1) >= max(1.0, min_fraction * images.shape[1] * images.shape[2])
    return np.where(enough, counts.argmax(1), UNCLEAR).astype(np.int64)


def person_groups(data) -> dict[str, list[int]]:
    """Base emoji name -> indices of its images (the base first), for the emoji that have skin-tone variants."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (name, tone) in enumerate(zip(data.names, data.tones)):
        groups[name].insert(0, i) if tone == "" else groups[name].append(i)
    return {n: idx for n, idx in groups.items() if len(idx) > 1 and data.tones[idx[0]] == ""}


def tone_accuracy(data) -> dict:
    """The classifier on the images of ``data`` (EmojiData) that show people in a single tone (their emoji has
    skin-tone variants): overall and per-class accuracy, and the confusion matrix (true rows × TONE_BINS)."""
    idx = [i for g in person_groups(data).values() for i in g if tone_index(data.tones[i]) is not None]
    if not idx:
        raise DataError(f"{data.source} has no person emoji with skin-tone variants")
    true = np.array([tone_index(data.tones[i]) for i in idx])
    pred = classify_tones(data.images[idx])
    confusion = np.zeros((len(TONE_CLASSES), len(TONE_BINS)), np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = {TONE_CLASSES[k]: round(float(confusion[k, k] / max(1, confusion[k].sum())), 4)
                 for k in range(len(TONE_CLASSES))}
    return {"n": len(idx), "accuracy": float((pred == true).mean()), "per_class": per_class,
            "confusion": confusion.tolist()}


def derive_skin_colours(data) -> np.ndarray:
    """How SKIN_COLOURS was made (see the module docstring): 6×3 uint8, the modal tone-dependent colour."""
    full = [g for g in person_groups(data).values()
            if sorted(tone_index(data.tones[i]) or 0 for i in g) == list(range(len(TONE_CLASSES)))]
    if not full:
        raise DataError(f"{data.source} has no emoji with all five single-tone variants")
    counters = [Counter() for _ in TONE_CLASSES]
    for g in full:
        order = sorted(g, key=lambda i: tone_index(data.tones[i]))
        imgs = data.images[order].astype(np.int64)
        changed = (np.abs(imgs - imgs[:1]).sum(-1) > 30).any(0)
        for k in range(len(TONE_CLASSES)):
            counters[k].update(map(tuple, imgs[k][changed].tolist()))
    return np.array([c.most_common(1)[0][0] for c in counters], np.uint8)
