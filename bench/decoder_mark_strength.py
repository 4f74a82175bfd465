"""The decoder mark's strength trade-off: detection against the change of the sample distribution, per scale.

    OMP_NUM_THREADS=1 python bench/decoder_mark_strength.py --model pretrained:emoji --samples 400 \
        --scales 1 0.7 0.5 0.35 0.25 --json docs/bench/decoder-mark-strength-emoji.json

The same `--samples` unwatermarked samples (seed 1, as bench/watermark.py's set A) are marked with the residual
multiplied by each scale. For each scale: the PSNR of the mark, the FD of the marked samples against `--real`
real images next to the FD of the same samples unmarked (a paired comparison: the mark's own cost), and the
decoder mark's detection rate at p ≤ 1e-3 under each attack of bench/watermark.py. The false-positive rate of
the decoder mark is measured once, on the real images and the unmarked samples under each attack. Only the
decoder mark is tested (it needs no inversion, so this runs in minutes); bench/watermark.py measures both
layers together.

Where does the FD cost come from? At scale 1 the residual r is split into its per-image, per-channel mean
(a colour cast) and the rest, and the paired FD cost of each part alone is measured, next to that of Gaussian
noise of the same PSNR as the full residual. It is also split into the part that all messages share (the mean
residual over 8 random messages, 4 pairs of complements, per image) and the message's own part. The mean shift
it gives pixels at 0 or 255 (where it clips to one sign) is measured alone. `--keys K` measures the paired FD
cost for K more random keys: a deployment's key is random, and the cost depends on it. `--nets` tests another
file of nets (an older version, say).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from watermark import ATTACKS, generate, load_real

from latentdiff.evaluation.metrics import fd_from_features
from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.decoder_mark import embed_uint8, load_marknet, mark_score, message
from latentdiff.pipeline.watermark import DEFAULT_P_VALUE, WatermarkKey, p_value
from latentdiff.utils.files import write_text_atomic


def detected(nets, images: np.ndarray, bits: np.ndarray) -> float:
    """The fraction of images whose decoder-mark p-value is at most 1e-3."""
    return float(np.mean([p_value(float(t)) <= DEFAULT_P_VALUE for t in mark_score(nets, images, bits)]))


def fd_cost_parts(nets, bits: np.ndarray, plain: np.ndarray, fd_cost, messages: int = 8) -> dict:
    """The paired FD cost (`fd_cost` of uint8 images) of the full residual at scale 1, of its per-image, per-channel
    mean alone (a colour cast), of the rest alone, of the part shared by all messages (estimated per image as the
    mean residual of `messages` random messages, drawn as pairs of complements), of the rest alone, of the mean
    shift of the pixels at 0 or 255 (each image's mean residual there, where it clips to one sign, put on those
    pixels alone), and of Gaussian noise with the residual's standard deviation."""
    def residual_for(m: np.ndarray) -> np.ndarray:
        return embed_uint8(nets, plain, m, 1.0).astype(np.float64) - plain

    residual = residual_for(bits)
    cast = residual.mean((1, 2), keepdims=True)
    rng = np.random.default_rng(0)
    pairs = [rng.integers(0, 2, len(bits)) for _ in range(messages // 2)]  # each with its complement: less noise
    shared = np.mean([residual_for(m) + residual_for(1 - m) for m in pairs], 0) / 2
    saturated = (plain == 0) | (plain == 255)  # where the residual can only go one way: it clips
    n_sat = np.maximum(saturated.sum((1, 2), keepdims=True), 1)
    sat_shift = (residual * saturated).sum((1, 2), keepdims=True) / n_sat  # per image and channel
    noise = rng.normal(0, residual.std(), plain.shape)
    variants = {"full": plain + residual, "cast_only": plain + cast, "without_cast": plain + residual - cast,
                "shared_only": plain + shared, "without_shared": plain + residual - shared,
                "saturated_shift_only": plain + sat_shift * saturated, "gaussian_same_psnr": plain + noise}
    costs = {f"fd_cost_{name}": round(float(fd_cost(np.clip(np.round(imgs), 0, 255).astype(np.uint8))), 3)
             for name, imgs in variants.items()}
    power = {"full": residual, "shared": shared}
    return {"mean_cast_per_channel": [round(float(v), 3) for v in cast.mean((0, 1, 2))],
            "saturated_fraction": round(float(saturated.mean()), 4),
            "mean_shift_on_saturated": round(float((residual * saturated).sum() / max(saturated.sum(), 1)), 3),
            "residual_power": {k: round(float(np.mean(v**2)), 3) for k, v in power.items()}, **costs}


def fd_cost_per_key(nets, plain: np.ndarray, fd_cost, keys: int) -> dict:
    """The paired FD cost (scale 1) for `keys` random keys: min, mean, max and each."""
    costs = [float(fd_cost(embed_uint8(nets, plain, message(WatermarkKey(f"random key {k}".encode(), "bench")))))
             for k in range(keys)]
    return {"keys": keys, "min": round(min(costs), 3), "mean": round(float(np.mean(costs)), 3),
            "max": round(max(costs), 3), "each": [round(c, 3) for c in costs]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pretrained:emoji")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--real", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.35, 0.25])
    ap.add_argument("--keys", type=int, default=0, help="also measure the FD cost for this many random keys")
    ap.add_argument("--nets", help="a nets file to test instead of the shipped one")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.time()
    model = LatentDiffusion.load(args.model)
    key = WatermarkKey(b"benchmark key: a stand-in for an installation secret", "bench")
    real, _, _, ext = load_real(model, args.real, 0)
    c, h, _ = model.image_shape
    nets, bits = load_marknet(h, c, path=args.nets), message(key)
    plain = generate(model, args.samples, args.steps, 1)
    f_real = ext.features(real)
    fd_plain = fd_from_features(f_real, ext.features(plain))
    fpr = {att: {"real": detected(nets, fn(real), bits), "samples": detected(nets, fn(plain), bits)}
           for att, fn in ATTACKS.items()}
    rows = []
    for scale in args.scales:
        marked = embed_uint8(nets, plain, bits, scale)
        psnr = 10 * np.log10(255**2 / np.mean((marked.astype(np.float64) - plain) ** 2))
        rows.append({"scale": scale, "psnr": round(float(psnr), 2),
                     "fd": round(float(fd_from_features(f_real, ext.features(marked))), 3),
                     "tpr": {att: detected(nets, fn(marked), bits) for att, fn in ATTACKS.items()}})
        print(json.dumps(rows[-1]), flush=True)
    def fd_cost(imgs: np.ndarray) -> float:
        return fd_from_features(f_real, ext.features(imgs)) - fd_plain

    parts = fd_cost_parts(nets, bits, plain, fd_cost)
    print(json.dumps(parts), flush=True)
    per_key = fd_cost_per_key(nets, plain, fd_cost, args.keys) if args.keys else None
    result = {"model": args.model, "samples": args.samples, "real": args.real, "steps": args.steps,
              "nets": Path(args.nets).name if args.nets else "shipped",  # a name, never a machine's path
              "fd_unmarked": round(float(fd_plain), 3), "fpr": fpr, "rows": rows,
              "fd_cost_parts": parts, "fd_cost_per_key": per_key,
              "shipped_scale": float(nets.meta.get("scale", 1.0)), "seconds": round(time.time() - t0)}
    print(json.dumps(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
