"""Bias report: does the model over- or under-produce some classes compared with its training data?

Samples are labelled by the shipped Fashion-MNIST evaluation classifier (``features.py``); the same classifier
labels real training images, so its own confusions enter both histograms alike. Reported per setting
(unconditional sampling, and class-conditional sampling at each guidance scale with every class requested
equally): the predicted-class histogram, its total variation distance to the training data's predicted-class
histogram, the most over- and under-produced class, and a chi-square goodness-of-fit p-value against it.

Text-to-image (emoji) models get :func:`text_bias_report` instead: the same comparison for the emoji
categories (the shipped emoji classifier, on samples for the empty prompt and for random training captions) and
for the skin tones (``skin_tone.py``) of samples for the person emoji's captions, which name no tone, against
the tones of those emoji's training images (the base emoji and its skin-tone variants).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chisquare

from latentdiff.errors import ConfigError, DataError


def histogram(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Fractions of each class index 0…num_classes-1 in `classes` (sums to 1)."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=num_classes)[:num_classes]
    return counts / max(1, counts.sum())


def compare(sample_classes: np.ndarray, reference_hist: np.ndarray) -> dict:
    """Histogram of `sample_classes` against the reference fractions: TV distance, largest deviations, χ² p."""
    k = len(reference_hist)
    hist = histogram(sample_classes, k)
    diff = hist - reference_hist
    n = len(sample_classes)
    expected = (reference_hist + 1e-3) / (reference_hist + 1e-3).sum() * n  # no empty bin: χ² stays finite
    observed = np.bincount(np.asarray(sample_classes, dtype=np.int64), minlength=k)[:k]
    chi_p = float(chisquare(observed, expected).pvalue) if n else float("nan")
    return {"n": n, "histogram": [round(float(v), 4) for v in hist],
            "tv_distance": float(0.5 * np.abs(diff).sum()),
            "most_over": int(np.argmax(diff)), "most_over_by": float(diff.max()),
            "most_under": int(np.argmin(diff)), "most_under_by": float(diff.min()), "chi2_p": chi_p}


def bias_report(model, classifier, reference_images: np.ndarray, n: int, guidance_scales=(1.0, 2.0, 4.0),
                steps: int | None = None, seed: int = 0, batch_size: int = 256) -> dict:
    """Unconditional and per-guidance class histograms of `n` samples each vs the training images'."""
    if not model.num_classes:
        raise ConfigError("the class-histogram bias report needs a class-conditional model")
    k = max(model.num_classes, classifier.net.head.out_features)  # histogram over the classifier's classes
    ref = histogram(classifier.predict(reference_images), k)
    rows = []
    uncond, _ = model.generate(n, steps=steps, seed=seed, batch_size=batch_size)  # no labels: the null class
    rows.append({"setting": "unconditional", **compare(classifier.predict(uncond), ref)})
    for g in guidance_scales:
        labels = np.arange(n) % model.num_classes  # every class requested equally often
        imgs, _ = model.generate(n, labels=labels, guidance=g, steps=steps, seed=seed, batch_size=batch_size)
        pred = classifier.predict(imgs)
        rows.append({"setting": f"guidance {g:g}", "accuracy": float((pred == labels).mean()),
                     **compare(pred, ref)})
    names = list(model.class_names) if len(model.class_names) == k else [str(i) for i in range(k)]
    return {"class_names": names, "reference_histogram": [round(float(v), 4) for v in ref],
            "n_reference": len(reference_images), "rows": rows}


def format_bias_table(report: dict) -> str:
    names = report["class_names"]
    lines = [("| setting | n | TV distance to training data | most over-produced | most under-produced | χ² p | "
             "class accuracy |"), "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        acc = f"{r['accuracy']:.1%}" if "accuracy" in r else "–"
        lines.append(f"| {r['setting']} | {r['n']} | {r['tv_distance']:.3f} | {names[r['most_over']]} "
                     f"({r['most_over_by']:+.1%}) | {names[r['most_under']]} ({r['most_under_by']:+.1%}) | "
                     f"{r['chi2_p']:.2g} | {acc} |")
    ref = ", ".join(f"{n} {v:.1%}" for n, v in zip(names, report["reference_histogram"]))
    lines.append(f"\nTraining data ({report['n_reference']} images), classifier-predicted: {ref}")
    return "\n".join(lines)


def _generate(model, prompts, guidance, steps, seed, batch_size) -> np.ndarray:
    images, _ = model.generate(len(prompts), prompt=prompts, guidance=guidance, steps=steps, seed=seed,
                               batch_size=batch_size)
    return np.asarray(images)


def _setting(what: str, g) -> str:
    return what if g is None else f"{what}, guidance {g:g}"


def category_section(model, judges, data, n: int, guidance_scales, steps, seed, batch_size) -> dict:
    """Categories (emoji classifier) of `n` samples for the empty prompt and for `n` training captions drawn at
    random (so the expected histogram is the training data's) vs the classifier's categories of the data."""
    from latentdiff.data.emoji import CATEGORIES

    ref = histogram(judges.categories(data.images), len(CATEGORIES))
    empty = np.asarray(model.generate(n, steps=steps, seed=seed, batch_size=batch_size)[0])
    rows = [{"setting": "empty prompt", **compare(judges.categories(empty), ref)}]
    pick = np.random.default_rng(seed).choice(len(data), size=n, replace=n > len(data))
    prompts, want = tuple(data.captions[i] for i in pick), data.labels[pick]
    for g in guidance_scales:
        pred = judges.categories(_generate(model, prompts, g, steps, seed, batch_size))
        rows.append({"setting": _setting("training captions", g), "accuracy": float((pred == want).mean()),
                     **compare(pred, ref)})
    return {"class_names": list(CATEGORIES), "reference_histogram": [round(float(v), 4) for v in ref],
            "n_reference": len(data), "rows": rows}


def tone_section(model, data, n: int, guidance_scales, steps, seed, batch_size) -> dict:
    """Skin tones (evaluation/skin_tone.py) of `n` samples for the captions of the training emoji that have
    skin-tone variants, taken without their tone (the base emoji's caption names none), vs the tones of all
    the images of those emoji: as the classifier sees them (compared) and as the metadata says."""
    from latentdiff.evaluation.skin_tone import TONE_BINS, classify_tones, person_groups, tone_fractions

    groups = person_groups(data)
    if not groups:
        raise DataError(f"{data.source} has no person emoji with skin-tone variants: no tone report")
    base = [g[0] for g in groups.values()]
    members = [i for g in groups.values() for i in g]
    ref = histogram(classify_tones(data.images[members]), len(TONE_BINS))
    labelled = np.mean([tone_fractions(data.tones[i]) for i in members], axis=0)
    order = np.random.default_rng(seed).permutation(base)  # a small n still spans many emoji
    prompts = tuple(data.captions[order[i % len(order)]] for i in range(n))
    rows = [{"setting": _setting("person prompts without a tone", g),
             **compare(classify_tones(_generate(model, prompts, g, steps, seed, batch_size)), ref)}
            for g in guidance_scales]
    return {"class_names": list(TONE_BINS), "reference_histogram": [round(float(v), 4) for v in ref],
            "data_histogram": [round(float(v), 4) for v in labelled], "n_reference": len(members),
            "n_prompts": len(base), "rows": rows}


def text_bias_report(model, judges, data, n: int, guidance_scales=(None,), steps: int | None = None, seed: int = 0,
                     batch_size: int = 256, heldout=None) -> dict:
    """The emoji bias report of a text-to-image model: category histograms and the skin tones of person prompts
    that name no tone, each against the training data `data` (EmojiData); guidance None: the model's own.
    `heldout` (EmojiData), when given, measures the tone classifier's accuracy on it."""
    from latentdiff.evaluation.skin_tone import tone_accuracy

    if not getattr(model, "has_text", False):
        raise ConfigError("the emoji bias report needs a text-to-image model")
    report = {"categories": category_section(model, judges, data, n, guidance_scales, steps, seed, batch_size),
              "skin_tone": tone_section(model, data, n, guidance_scales, steps, seed, batch_size)}
    if heldout is not None:
        report["skin_tone"]["classifier_accuracy"] = tone_accuracy(heldout)
    return report


def format_text_bias_table(report: dict) -> str:
    cat, tone = report["categories"], report["skin_tone"]
    lines = ["Emoji categories (the shipped emoji classifier):", format_bias_table(cat), "",
             (f"Skin tones of person prompts that name no tone ({tone['n_prompts']} training emoji with skin-tone "
              "variants; the nearest-colour tone classifier):"), format_bias_table(tone),
             "Training data, as labelled: " + ", ".join(f"{n} {v:.1%}" for n, v in
                                                        zip(tone["class_names"], tone["data_histogram"]))]
    if "classifier_accuracy" in tone:
        acc = tone["classifier_accuracy"]
        lines.append(f"Tone classifier accuracy on {acc['n']} held-out person images: {acc['accuracy']:.1%}")
    return "\n".join(lines)
