"""Train the emoji judges on the emoji training split and ship them in src/latentdiff/assets/.

    nice -n 15 env OMP_NUM_THREADS=1 python scripts/train_emoji_eval_models.py [classifier|clip] [--steps N]

Needs the full set (`latentdiff download emoji`). Prints held-out accuracy and R-precision on real images.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from latentdiff.data.emoji import load_emoji
from latentdiff.evaluation.emoji_nets import tokenize
from latentdiff.evaluation.emoji_train import classifier_accuracy, to_input, train_emoji_classifier, train_emoji_clip
from latentdiff.evaluation.text_to_image import r_precision
from latentdiff.utils.state import save_state

ASSETS = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=("classifier", "clip"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    train, held = load_emoji("train", bundled=False), load_emoji("heldout", bundled=False)
    if args.which == "classifier":
        net, meta = train_emoji_classifier(train, steps=args.steps)
        meta["train_metrics"] = classifier_accuracy(net, train, meta["subcategories"])
        meta["heldout_metrics"] = classifier_accuracy(net, held, meta["subcategories"])
        out = Path(args.out or ASSETS / "emoji_classifier.safetensors")
    else:
        net, meta = train_emoji_clip(train, steps=args.steps)
        with torch.no_grad():
            for name, data in (("train", train), ("heldout", held)):
                img = net.embed_images(to_input(data.images)).numpy()
                pool = sorted(set(data.captions))
                txt = net.embed_text(*tokenize(pool, meta["vocab"])).numpy()
                true_index = np.array([pool.index(c) for c in data.captions])
                mean, std, k = r_precision(img, true_index, txt)
                meta[f"{name}_r_precision"] = {"mean": mean, "std": std, "candidates": k}
        out = Path(args.out or ASSETS / "emoji_clip.safetensors")
    save_state(out, {k: v.float() for k, v in net.state_dict().items() if v.is_floating_point()}, meta)
    print(json.dumps({k: v for k, v in meta.items() if k not in ("vocab", "subcategories")}, indent=1))
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
