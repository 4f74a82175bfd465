"""Train the decoder-mark networks for a shipped model's image size and ship them in src/latentdiff/assets/.

    nice -n 15 python scripts/train_marknet.py --model pretrained:fashion-mnist --steps 4000
    nice -n 15 python scripts/train_marknet.py --model pretrained:emoji --steps 4000

Covers are the model's training images and the autoencoder's reconstructions of them. Prints the bit accuracy
and the detection score on held-out covers after each benchmark attack (bench/watermark.py measures the rest).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.control import reconstruct
from latentdiff.pipeline.decoder_mark import (
    MARK_BITS,
    asset_path,
    embed_uint8,
    load_marknet,
    mark_score,
    save_marknet,
)
from latentdiff.training.marknet import train_marknet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from watermark import ATTACKS


def covers(model, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(training covers, held-out covers): real images and their reconstructions by the model's autoencoder."""
    if model.has_text:
        from latentdiff.data.emoji import load_emoji

        train, held = load_emoji("train", bundled=False).images, load_emoji("heldout", bundled=False).images
    else:
        from latentdiff.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist

        root = find_fashion_mnist()
        train = load_fashion_mnist(root, "train")[0][..., None]
        held = load_fashion_mnist(root, "test")[0][:500, ..., None]
    train = train[np.random.default_rng(0).permutation(len(train))[:limit]]
    recon = np.concatenate([reconstruct(model, train[i:i + 256]) for i in range(0, len(train), 256)])
    return np.concatenate([train, recon]), np.concatenate([held, reconstruct(model, held)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pretrained:fashion-mnist")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--psnr", type=float, default=38.0)
    ap.add_argument("--zero-mean", action="store_true", help="subtract each channel's mean from the residual")
    ap.add_argument("--odd", action="store_true",
                    help="a residual that changes sign with the message: no pattern shared by every message")
    ap.add_argument("--restore-mean", action="store_true",
                    help="record in the nets that embedding puts each channel's mean back after clipping")
    ap.add_argument("--jpeg-gradient", choices=("model", "identity"), default="model",
                    help="the JPEG attack's gradient: the JPEG model's (training/jpeg_model.py) or the identity")
    ap.add_argument("--limit", type=int, default=10000, help="training images used (each also reconstructed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = LatentDiffusion.load(args.model)
    train, held = covers(model, args.limit)
    emb, ext, summary = train_marknet(train, MARK_BITS, args.steps, args.batch, args.psnr,
                                       zero_mean=args.zero_mean, jpeg_gradient=args.jpeg_gradient, odd=args.odd)
    c, size, _ = model.image_shape
    out = Path(args.out or asset_path(size, c))
    save_marknet(out, emb, ext, {"trained_for": args.model, **summary, "restore_mean": args.restore_mean})
    rng = np.random.default_rng(1)
    message = rng.integers(0, 2, MARK_BITS)
    nets = load_marknet(size, c, path=out)
    marked = embed_uint8(nets, held, message)
    diff = marked.astype(np.float64) - held
    report = {"psnr_heldout": round(float(10 * np.log10(255**2 / np.mean(diff**2))), 2)}
    for name, fn in ATTACKS.items():
        s_w, s_n = mark_score(nets, fn(marked), message), mark_score(nets, fn(held), message)
        report[name] = {"mean_score_marked": round(float(s_w.mean()), 3),
                        "min_score_marked": round(float(s_w.min()), 3),
                        "frac_marked_ge_3.5": round(float((s_w >= 3.5).mean()), 4),
                        "mean_score_unmarked": round(float(s_n.mean()), 3),
                        "max_score_unmarked": round(float(s_n.max()), 3)}
    print(json.dumps({"summary": summary, "heldout": report}, indent=1))


if __name__ == "__main__":
    main()
