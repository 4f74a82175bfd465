"""Watermark benchmark: TPR at a measured FPR per attack and per layer, and FD with and without the watermark.

    nice -n 15 python bench/watermark.py --model pretrained:fashion-mnist --real 2000 --samples 400 \
        --json docs/bench/watermark.json --md docs/bench/watermark.md

Sets: `--samples` watermarked samples (key W: both layers), `--edits` real test images edited with the key (SDEdit
at strength 0.5, the `edit` command's path) and as many inpainted with it (RePaint, the right half regenerated:
decoder mark only), `--negatives` unwatermarked samples (seed A; its first `--samples` and `--fd-seeds` − 1 more
sets, seeds B, C, …, give the FD spread), `--real` real test images (not the edited ones). Every class in turn, the
model's default guidance, `--steps` DDIM steps. Attacks: none, JPEG quality 75, 0.5× downscale + upscale (bilinear),
Gaussian noise σ = 2/255 (clipped, rounded), each applied to every set. For each attack and layer (noise mark,
decoder mark, both: the smaller p-value times 2, as `verify` does): TPR at the stated p-value threshold (1e-3) and
the measured FPR of that threshold on real images and on unwatermarked samples, plus the empirical TPR (both layers)
at the lowest threshold whose measured FPR ≤ 0.1%. FD (shipped classifier features) of each sample set against the
real images: the watermarked set's FD should sit within the range of the unwatermarked seeds' FDs.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from latentdiff.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from latentdiff.evaluation.features import ClassifierExtractor
from latentdiff.evaluation.metrics import fd_from_features
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.control import img2img
from latentdiff.pipeline.decoder_mark import mark_score, message, nets_for
from latentdiff.pipeline.inpaint import inpaint
from latentdiff.pipeline.watermark import (
    DEFAULT_P_VALUE,
    WatermarkKey,
    noise_estimate,
    p_value,
    patterns,
    scores,
)
from latentdiff.utils.files import write_text_atomic
from latentdiff.utils.images import jpeg_roundtrip


def jpeg(images: np.ndarray, quality: int = 75) -> np.ndarray:
    return jpeg_roundtrip(images, quality)


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


def load_real(model, n_real: int, n_edit: int):
    """(real images, images to edit, their condition: labels or captions, the FD extractor) for the model."""
    if model.has_text:  # emoji: all 3,786 images (train and held-out), in a fixed shuffled order
        from latentdiff.data.emoji import load_emoji
        from latentdiff.evaluation.features import get_extractor

        data = load_emoji("all", bundled=False)
        order = np.random.default_rng(0).permutation(len(data.images))
        images, captions = data.images[order], [data.captions[i] for i in order]
        edit = slice(n_real, n_real + n_edit)
        return images[:n_real], images[edit], {"prompt": captions[edit]}, get_extractor("emoji-classifier")
    images, labels = load_fashion_mnist(find_fashion_mnist(), "test")
    edit = slice(n_real, n_real + n_edit)
    return images[:n_real, ..., None], images[edit, ..., None], {"labels": list(labels[edit])}, ClassifierExtractor()


def conditions(model, n: int) -> dict:
    """Every class in turn, or the training captions in a fixed shuffled order (text models): the data set lists
    them by category, so the first n in order would be nearly all smileys, which invert better than the rest."""
    if model.has_text:
        from latentdiff.data.emoji import load_emoji

        captions = load_emoji("train", bundled=False).captions
        order = np.random.default_rng(1).permutation(len(captions))
        return {"prompt": [captions[order[i % len(captions)]] for i in range(n)]}
    return {"labels": list(np.arange(n) % model.num_classes)} if model.num_classes else {}


def generate(model, n: int, steps: int, seed: int, key=None) -> np.ndarray:
    images, _ = model.generate(n, steps=steps, sampler="ddim", seed=seed, batch_size=100, watermark=key,
                               **conditions(model, n))
    return images


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pretrained:fashion-mnist")
    ap.add_argument("--real", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=500)
    ap.add_argument("--negatives", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fd-seeds", type=int, default=2,
                    help="unwatermarked sample sets (seeds) whose FDs give the seed-to-seed spread (at least 2)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes that test the attacks in parallel (forked after generation, one thread each)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    if args.fd_seeds < 2:
        ap.error("--fd-seeds must be at least 2: a spread needs two sets")
    torch.manual_seed(0)
    t_start = time.time()
    model = LatentDiffusion.load(args.model)
    key = WatermarkKey(b"benchmark key: a stand-in for an installation secret", "bench")
    real, to_edit, edit_cond, ext = load_real(model, args.real, args.edits)
    half = np.zeros(to_edit.shape[1:3], dtype=bool)
    half[:, half.shape[1] // 2:] = True
    sets = {"wm": generate(model, args.samples, args.steps, 3, key),
            "edit": img2img(model, to_edit, 0.5, steps=args.steps, sampler="ddim", seed=4, watermark=key, **edit_cond),
            "inpaint": inpaint(model, to_edit, half, steps=args.steps, seed=5, watermark=key, **edit_cond),
            "A": generate(model, args.negatives, args.steps, 1)}
    # more unwatermarked sets for the FD spread: B (seed 2) as before, then seeds 10, 11, …
    fd_sets = ["A", *(chr(ord("B") + i) for i in range(args.fd_seeds - 1))]
    sets.update({name: generate(model, args.samples, args.steps, 2 if name == "B" else 8 + i)
                 for i, name in enumerate(fd_sets[1:], start=1)})
    print(f"generated in {time.time() - t_start:.0f} s", flush=True)
    f_real = ext.features(real)
    # FD needs more samples than feature dimensions (129 for the 128-d classifier); equal set sizes
    fd = ({name: fd_from_features(f_real, ext.features(sets[name][:args.samples])) for name in ("wm", *fd_sets)}
          if args.samples > ext.dim else None)
    k = patterns(model.autoencoder.latent_shape)
    nets = nets_for(model.image_shape)
    _ATTACK_CONTEXT.update(model=model, nets=nets, key=key, k=k, real=real, t_start=t_start,
                           sets={name: imgs for name, imgs in sets.items() if name not in fd_sets[1:]})
    if args.workers > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            rows = list(pool.map(attacked_row, ATTACKS))
    else:
        rows = [attacked_row(attack) for attack in ATTACKS]
    result = {"model": args.model, "bits": math.prod(model.autoencoder.latent_shape), "patterns": k,
              "decoder_mark": None if nets is None else {k_: nets.meta[k_] for k_ in ("bits", "psnr", "steps")},
              "p_threshold": DEFAULT_P_VALUE, "steps": args.steps, "fd": fd, "rows": rows,
              "seconds": round(time.time() - t_start), "threads": torch.get_num_threads(), "workers": args.workers}
    print(json.dumps(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.md:
        write_text_atomic(args.md, markdown(result))
    return result


LAYERS = ("both", "noise", "decoder")
_ATTACK_CONTEXT: dict = {}  # what attacked_row reads: set by main before the workers fork


def attacked_row(attack: str) -> dict:
    """One attack applied to every set (and the real images), tested by each layer."""
    c, fn = _ATTACK_CONTEXT, ATTACKS[attack]
    p = {name: layer_p_values(c["model"], c["nets"], fn(imgs), c["key"], c["k"]) for name, imgs in c["sets"].items()}
    p["real"] = layer_p_values(c["model"], c["nets"], fn(c["real"]), c["key"], c["k"])
    row = attack_row(attack, p)
    print(json.dumps(row), f"{time.time() - c['t_start']:.0f} s", flush=True)
    return row


def layer_p_values(model, nets, images: np.ndarray, key: WatermarkKey, k: int) -> dict[str, np.ndarray]:
    """The stated p-value of each image under each layer, and of both together (2 × the smaller, as `verify`)."""
    t = scores(noise_estimate(model, images), key).numpy()
    out = {"noise": np.array([p_value(float(v), k) for v in t]), "noise_score": t}
    if nets is not None:
        d = mark_score(nets, images, message(key, int(nets.meta["bits"])))
        out.update(decoder=np.array([p_value(float(v)) for v in d]), decoder_score=d)
        out["both"] = np.minimum(1.0, 2 * np.minimum(out["noise"], out["decoder"]))
    else:
        out["both"] = out["noise"]
    return out


def attack_row(attack: str, p: dict[str, dict[str, np.ndarray]]) -> dict:
    """TPR and FPR at the stated 1e-3 for each layer, mean scores, and the TPR at a measured FPR ≤ 0.1%."""
    row = {"attack": attack, **{f"n_{name}": len(v["noise"]) for name, v in p.items()}}
    for layer in LAYERS:
        if layer not in p["wm"]:
            continue
        sfx = "" if layer == "both" else f"_{layer}"
        for name in ("wm", "edit", "inpaint"):
            row[f"tpr_{name}{sfx}"] = float((p[name][layer] <= DEFAULT_P_VALUE).mean())
        for name in ("real", "A"):
            row[f"fpr_{name}{sfx}"] = float((p[name][layer] <= DEFAULT_P_VALUE).mean())
    for score in ("noise_score", "decoder_score"):
        if score in p["wm"]:
            row.update({f"mean_{score}_{name}": float(v[score].mean()) for name, v in p.items()})
    neg = -np.log(np.concatenate([p["A"]["both"], p["real"]["both"]]))
    # empirical: the lowest threshold whose measured FPR over all negatives is ≤ 0.1%
    t_emp = float(np.sort(neg)[-max(1, int(len(neg) * 1e-3)) - 1]) if len(neg) >= 1000 else None
    row["tpr_at_measured_fpr_0.1%"] = (float((-np.log(p["wm"]["both"]) > t_emp).mean())
                                       if t_emp is not None else None)
    return row


def markdown(r: dict) -> str:
    dec = r.get("decoder_mark")
    lines = [(f"Model `{r['model']}`: noise mark on {r['bits']} latent coordinates ({r['patterns']} patterns per key)"
              + (f", decoder mark of {dec['bits']} bits (nets trained {dec['steps']} steps, PSNR {dec['psnr']:.1f} dB)"
                 if dec else ", no decoder mark for this size")
              + f"; detected when the stated p-value (false-positive rate) is ≤ {r['p_threshold']:g}; samples with "
              f"{r['steps']} DDIM steps; edits are SDEdit at strength 0.5 of real test images with the key, inpaints "
              "regenerate their right half (RePaint)."), "",
             "Each cell: both layers (as `verify`) / noise mark alone / decoder mark alone.", "",
             ("| attack | TPR samples | TPR edits | TPR inpaints | FPR real | FPR unwatermarked samples | "
              "TPR (both) at measured FPR ≤ 0.1% |"),
             "|---|---|---|---|---|---|---|"]

    def cell(row, stem, pct=".1%"):
        vals = [row.get(stem + sfx) for sfx in ("", "_noise", "_decoder")]
        return " / ".join("–" if v is None else format(v, pct) for v in vals)

    for w in r["rows"]:
        emp = "n/a" if w["tpr_at_measured_fpr_0.1%"] is None else f"{w['tpr_at_measured_fpr_0.1%']:.1%}"
        lines.append(f"| {w['attack']} | {cell(w, 'tpr_wm')} (n={w['n_wm']}) | {cell(w, 'tpr_edit')} (n={w['n_edit']}) | "
                     f"{cell(w, 'tpr_inpaint')} (n={w['n_inpaint']}) | {cell(w, 'fpr_real', '.2%')} (n={w['n_real']}) | "
                     f"{cell(w, 'fpr_A', '.2%')} (n={w['n_A']}) | {emp} |")
    lines += ["", fd_line(r["fd"]), ""]
    return "\n".join(lines)


def fd_line(fd: dict | None) -> str:
    """The FD sentence: the watermarked set's FD next to the unwatermarked seeds' range."""
    if fd is None:
        return "FD not measured (needs more than 128 samples per set)."
    plain = {name: v for name, v in fd.items() if name != "wm"}
    lo, hi = min(plain.values()), max(plain.values())
    where = "inside" if lo <= fd["wm"] <= hi else "outside"
    return (f"FD vs real (classifier features): watermarked {fd['wm']:.2f}; unwatermarked "
            + ", ".join(f"seed {name} {v:.2f}" for name, v in plain.items())
            + f" (range {lo:.2f}–{hi:.2f}, spread {hi - lo:.2f}): the watermarked FD is {where} the range.")


if __name__ == "__main__":
    main()
