"""The decoder mark, seen: samples without it, with it, and the difference amplified 20× around mid-grey.

    OMP_NUM_THREADS=1 python scripts/watermark_figure.py [--out docs/img]

Writes decoder-mark-fashion.png (one sample per class) and decoder-mark-emoji.png (the prompts below), both from
the shipped models. Deterministic: the same files every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.decoder_mark import embed_uint8, load_marknet, message
from latentdiff.pipeline.watermark import WatermarkKey
from latentdiff.utils.images import make_grid, save_png

KEY = WatermarkKey(b"figure key: a stand-in for an installation secret", "figure")
PROMPTS = ["a smiling face with sunglasses", "red apple", "a dog face", "flag of Japan", "a yellow star",
           "a red heart", "a green book", "a waving hand"]


def figure(name: str, n: int, **kw) -> np.ndarray:
    model = LatentDiffusion.load(name)
    plain, _ = model.generate(n, seed=0, sampler="ddim", steps=20, **kw)
    c, h, _ = model.image_shape
    marked = embed_uint8(load_marknet(h, c), plain, message(KEY))
    diff = np.clip(128 + 20 * (marked.astype(np.int16) - plain), 0, 255).astype(np.uint8)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - plain) ** 2))
    print(f"{name}: PSNR of the mark {psnr:.1f} dB, largest change {np.abs(marked.astype(int) - plain).max()} levels")
    return make_grid(np.concatenate([plain, marked, diff]), nrow=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out)
    save_png(figure("pretrained:fashion-mnist", 10, labels=list(range(10))), out / "decoder-mark-fashion.png",
             scale=3)
    save_png(figure("pretrained:emoji", len(PROMPTS), prompt=PROMPTS), out / "decoder-mark-emoji.png", scale=2)


if __name__ == "__main__":
    main()
