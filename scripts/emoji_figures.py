"""The README grid of pretrained:emoji: one row of samples per prompt, training and held-out captions mixed.

    OMP_NUM_THREADS=2 PYTHONPATH=src python scripts/emoji_figures.py [--model pretrained:emoji] [--out docs/img]

Each row is `latentdiff sample --model MODEL --prompt PROMPT --n 8 --seed 0` (same sampler, steps, guidance).
Also times 16 images from one prompt at the model's default 20-step solver, text encoding included
(the encoder is loaded in that time too: a fresh model object).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from latentdiff.pipeline import LatentDiffusion
from latentdiff.utils.images import make_grid, save_png

# (prompt, where it comes from): captions of the training split, of the held-out split (never trained on), and
# free text written for this figure.
PROMPTS = [
    ("grinning face, grinning, face-smiling", "train"),
    ("red apple, apple, food-fruit", "train"),
    ("evergreen tree, plant-other", "train"),
    ("andorra flag, flag-ad, country-flag", "train"),
    ("smiling face with open mouth and tightly-closed eyes, laughing, satisfied, face-smiling", "held-out"),
    ("cat, cat2, animal-mammal", "held-out"),
    ("afghanistan flag, flag-af, country-flag", "held-out"),
    ("a smiling cat face", "free text"),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained:emoji")
    p.add_argument("--out", default="docs/img")
    p.add_argument("--per-prompt", type=int, default=8)
    args = p.parse_args()
    t0 = time.perf_counter()
    pipe = LatentDiffusion.load(args.model)
    images, _ = pipe.generate(16, prompt="a smiling cat face", seed=0)
    print(f"16 images, prompt encoded, {pipe.cfg.sample.steps} {pipe.cfg.sample.sampler} steps: "
          f"{time.perf_counter() - t0:.1f} s including loading the model and the text encoder")
    for prompt in ("a red apple", "a green tree", "a smiling cat face"):  # warm: encoding, sampling, decoding
        t0 = time.perf_counter()
        pipe.generate(16, prompt=prompt, seed=1)
        print(f"16 images of {prompt!r} with the model loaded: {time.perf_counter() - t0:.2f} s")
    rows = []
    for prompt, origin in PROMPTS:
        imgs, _ = pipe.generate(args.per_prompt, prompt=prompt, seed=0)
        rows.append(imgs)
        print(f"row {len(rows)}: [{origin}] {prompt}")
    out = Path(args.out) / "emoji_prompts.png"
    save_png(make_grid(np.concatenate(rows), args.per_prompt), out,
             {"Software": "latentdiff", "latentdiff": {"model": args.model, "prompts": [p for p, _ in PROMPTS],
                                                       "seed": 0}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
