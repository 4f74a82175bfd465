"""Train the Fashion-MNIST classifier behind the `fashion-mnist-classifier` feature extractor.

    nice -n 15 python scripts/train_classifier.py   # full train split, 8 epochs: ~8 min on 2 idle CPU cores
    python scripts/train_classifier.py --data bundled --epochs 1 --limit 2000 --out clf-smoke.safetensors

Writes float16 weights + a JSON header (test accuracy, epochs, architecture version, ...) with
latentdiff.checkpoint.save_state to src/latentdiff/assets/fashion_mnist_classifier.safetensors.
The reported test accuracy is measured with the float16 weights exactly as shipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.data import load_dataset
from latentdiff.evaluation.features import CLASSIFIER_ARCH_VERSION, CLASSIFIER_ASSET, FashionMNISTClassifier
from latentdiff.utils.images import to_tensor
from latentdiff.utils.state import save_state

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "assets" / CLASSIFIER_ASSET


def augment(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random translation of up to `shift` px per image (x: N×1×H×W in [-1, 1])."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift:
        padded = F.pad(x, (shift,) * 4, value=-1.0)  # N×1×(H+2s)×(W+2s), background is black (-1)
        dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator) for _ in range(2))
        rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]  # N×H×1
        cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]  # N×1×W
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # N×1×H×W
    return x


@torch.no_grad()
def accuracy(net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    net.eval()
    pred = torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="data source: fashion-mnist (default) or bundled")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--shift", type=int, default=1, help="max random translation in pixels (0: none)")
    p.add_argument("--limit", type=int, help="use only the first N training images (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = load_dataset(args.data, "train", data_dir=args.data_dir, limit=args.limit)
    test = load_dataset(args.data, "test", data_dir=args.data_dir)
    x, y = to_tensor(train.images), torch.from_numpy(train.labels)  # N×1×28×28 in [-1, 1]
    xt, yt = to_tensor(test.images), torch.from_numpy(test.labels)
    print(f"train: {train.source}, {len(x)} images; test: {test.source}, {len(xt)} images", flush=True)

    net = FashionMNISTClassifier()
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.2)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(x[idx], args.shift, gen), y[idx]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / total:.4f}, train acc {correct / total:.4f}, "
              f"test acc {accuracy(net, xt, yt):.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0

    # Ship float16 weights and report the accuracy of exactly those weights.
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    acc = accuracy(net, xt, yt)
    meta = {"architecture_version": CLASSIFIER_ARCH_VERSION, "architecture": "FashionMNISTClassifier",
            "test_accuracy": round(acc, 4), "test_set": test.source.split(" from ")[0], "epochs": args.epochs,
            "train_images": len(x), "batch_size": args.batch_size, "lr": args.lr, "shift": args.shift,
            "flip": True, "seed": args.seed, "train_seconds": round(seconds), "dtype": "float16",
            "torch": torch.__version__, "script": "scripts/train_classifier.py"}
    save_state(args.out, half, meta)
    size = args.out.stat().st_size
    print(f"test accuracy {acc:.4f} (float16 weights); trained in {seconds:.0f} s; wrote {args.out} "
          f"({size / 1e6:.2f} MB)")
    if np.isnan(acc):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
