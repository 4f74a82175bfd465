"""Watermark benchmark: TPR at a measured FPR per attack, and FD with and without the watermark.

    nice -n 15 python bench/watermark.py --model pretrained:fashion-mnist --real 2000 --samples 400 \
        --json docs/bench/watermark.json --md docs/bench/watermark.md

Sets: `--samples` watermarked samples (key W), two sets of `--samples` unwatermarked samples (seeds A, B),
`--real` real test images (the full clean set; `--real-attacked` of them under each attack). Every
class in turn, the model's default guidance, `--steps` DDIM steps. Attacks: none, JPEG quality 75,
0.5× downscale + upscale (bilinear), Gaussian noise σ = 2/255 (clipped, rounded). For each attack: TPR at
the stated p-value threshold (1e-3) and the measured FPR of that threshold on real images and on
unwatermarked samples, plus the empirical TPR at the largest threshold whose measured FPR ≤ 0.1%.
FD (shipped classifier features) of each sample set against the real images: the watermarked set's FD
should sit within the A-vs-B seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time

import numpy as np
import torch
from PIL import Image

from latentdiff.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from latentdiff.evaluation.features import ClassifierExtractor
from latentdiff.evaluation.metrics import fd_from_features
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.watermark import DEFAULT_P_VALUE, WatermarkKey, agreements, invert_to_noise
from latentdiff.utils.files import write_text_atomic


def jpeg(images: np.ndarray, quality: int = 75) -> np.ndarray:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue()))).reshape(img.shape))
    return np.stack(out)


def resize_half(images: np.ndarray) -> np.ndarray:
    out = []
    for img in images:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        small = pil.resize((pil.width // 2, pil.height // 2), Image.BILINEAR)
        out.append(np.asarray(small.resize(pil.size, Image.BILINEAR)).reshape(img.shape))
    return np.stack(out)


def gaussian(images: np.ndarray, sigma: float = 2 / 255, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float64) / 255 + rng.normal(0, sigma, images.shape)
    return np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)


ATTACKS = {"clean": lambda x: x, "jpeg75": jpeg, "resize0.5": resize_half, "noise2/255": gaussian}


def k_threshold(bits: int, alpha: float) -> int:
    """The smallest k with P(Binomial(bits, 1/2) ≥ k) ≤ alpha."""
    from scipy.stats import binom

    return int(binom.isf(alpha, bits, 0.5)) + 1


def generate(model, n: int, steps: int, seed: int, key=None) -> np.ndarray:
    labels = list(np.arange(n) % model.num_classes) if model.num_classes else None
    images, _ = model.generate(n, labels=labels, steps=steps, sampler="ddim", seed=seed, batch_size=100,
                               watermark=key)
    return images


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pretrained:fashion-mnist")
    ap.add_argument("--real", type=int, default=2000)
    ap.add_argument("--real-attacked", type=int, default=500)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.time()
    model = LatentDiffusion.load(args.model)
    key = WatermarkKey(b"benchmark key: a stand-in for an installation secret", "bench")
    real = load_fashion_mnist(find_fashion_mnist(), "test")[0][:args.real][..., None]
    sets = {"wm": generate(model, args.samples, args.steps, 3, key),
            "A": generate(model, args.samples, args.steps, 1), "B": generate(model, args.samples, args.steps, 2)}
    print(f"generated in {time.time() - t_start:.0f} s", flush=True)
    ext = ClassifierExtractor()
    f_real = ext.features(real)
    # FD needs more samples than feature dimensions (129 for the 128-d classifier)
    fd = ({name: fd_from_features(f_real, ext.features(imgs)) for name, imgs in sets.items()}
          if args.samples > ext.dim else None)
    bits = math.prod(model.autoencoder.latent_shape)
    k_star = k_threshold(bits, DEFAULT_P_VALUE)
    rows = []
    for attack, fn in ATTACKS.items():
        r = real if attack == "clean" else real[:args.real_attacked]
        scores = {name: agreements(invert_to_noise(model, fn(imgs)), key).numpy()
                  for name, imgs in (("wm", sets["wm"]), ("samples", sets["A"]), ("real", r))}
        neg = np.concatenate([scores["samples"], scores["real"]])
        # empirical: the lowest threshold whose measured FPR over all negatives is ≤ 0.1%
        k_emp = int(np.sort(neg)[-max(1, int(len(neg) * 1e-3)) - 1] + 1) if len(neg) >= 1000 else None
        row = {"attack": attack, "tpr": float((scores["wm"] >= k_star).mean()),
               "fpr_real": float((scores["real"] >= k_star).mean()),
               "fpr_samples": float((scores["samples"] >= k_star).mean()),
               "n_wm": len(scores["wm"]), "n_real": len(scores["real"]), "n_samples": len(scores["samples"]),
               "mean_score_wm": float(scores["wm"].mean() / bits), "mean_score_real": float(scores["real"].mean() / bits),
               "mean_score_samples": float(scores["samples"].mean() / bits),
               "tpr_at_measured_fpr_0.1%": float((scores["wm"] >= k_emp).mean()) if k_emp else None}
        rows.append(row)
        print(json.dumps(row), f"{time.time() - t_start:.0f} s", flush=True)
    result = {"model": args.model, "bits": bits, "k_threshold": k_star, "p_threshold": DEFAULT_P_VALUE,
              "steps": args.steps, "fd": fd, "rows": rows, "seconds": round(time.time() - t_start)}
    print(json.dumps(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.md:
        write_text_atomic(args.md, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [(f"Model `{r['model']}`: {r['bits']} key bits, detected when ≥ {r['k_threshold']} agree "
             f"(p ≤ {r['p_threshold']:g}); samples with {r['steps']} DDIM steps."), "",
             ("| attack | TPR at p ≤ 1e-3 | FPR real | FPR unwatermarked samples | TPR at measured FPR ≤ 0.1% | "
             "mean score wm / real / samples |"), "|---|---|---|---|---|---|"]
    for w in r["rows"]:
        emp = "n/a" if w["tpr_at_measured_fpr_0.1%"] is None else f"{w['tpr_at_measured_fpr_0.1%']:.1%}"
        lines.append(f"| {w['attack']} | {w['tpr']:.1%} (n={w['n_wm']}) | {w['fpr_real']:.2%} (n={w['n_real']}) | "
                     f"{w['fpr_samples']:.2%} (n={w['n_samples']}) | {emp} | {w['mean_score_wm']:.3f} / "
                     f"{w['mean_score_real']:.3f} / {w['mean_score_samples']:.3f} |")
    fd = r["fd"]
    lines += ["", "FD not measured (needs more than 128 samples per set)." if fd is None else
              f"FD vs real (classifier features): watermarked {fd['wm']:.2f}; unwatermarked seed A "
              f"{fd['A']:.2f}, seed B {fd['B']:.2f} (seed-to-seed spread {abs(fd['A'] - fd['B']):.2f}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
