"""Bias report: does the model over- or under-produce some classes compared with its training data?

Samples are labelled by the shipped Fashion-MNIST evaluation classifier (``features.py``); the same classifier
labels real training images, so its own confusions enter both histograms alike. Reported per setting
(unconditional sampling, and class-conditional sampling at each guidance scale with every class requested
equally): the predicted-class histogram, its total variation distance to the training data's predicted-class
histogram, the most over- and under-produced class, and a chi-square goodness-of-fit p-value against it.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chisquare

from latentdiff.errors import ConfigError


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
