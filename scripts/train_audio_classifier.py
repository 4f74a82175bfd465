"""Train the spoken-digit classifier behind the `spoken-digit-classifier` feature extractor.

    nice -n 15 python scripts/train_audio_classifier.py            # the spoken-digit set in the cache
    python scripts/train_audio_classifier.py --epochs 1 --limit 500 --out /tmp/clf.safetensors   # smoke

Trains on the training voices, tests on the held-out voices (never heard in training), and writes float16
weights + a JSON header (held-out accuracy measured with the float16 weights as shipped) to
src/latentdiff/assets/spoken_digit_classifier.safetensors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latentdiff.data import load_dataset
from latentdiff.evaluation.audio_features import DIGIT_CLASSIFIER_ARCH_VERSION, DIGIT_CLASSIFIER_ASSET, DigitClassifier
from latentdiff.utils.images import to_tensor
from latentdiff.utils.state import save_state

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "assets" / DIGIT_CLASSIFIER_ASSET


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 8, gain: float = 0.15) -> torch.Tensor:
    """A random circular time shift of up to `shift` frames and a random level change (x: N×1×M×T in [-1, 1])."""
    n = len(x)
    k = int(torch.randint(-shift, shift + 1, (1,), generator=generator))
    x = x.roll(k, dims=3)
    level = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * gain  # ±gain of the [-1, 1] range (±7 dB)
    return torch.where(x > -1, (x + level).clamp(-1, 1), x)


@torch.no_grad()
def accuracy(net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    net.eval()
    pred = torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder of the spoken-digit set (default: the cache)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = load_dataset("spoken-digits", "train", data_dir=args.data_dir, limit=args.limit)
    test = load_dataset("spoken-digits", "test", data_dir=args.data_dir)
    x, y = to_tensor(train.images), torch.from_numpy(train.labels)  # N×1×64×64 in [-1, 1]
    xt, yt = to_tensor(test.images), torch.from_numpy(test.labels)
    print(f"train: {len(x)} clips; test (held-out voices): {len(xt)} clips", flush=True)

    net = DigitClassifier()
    steps = args.epochs * ((len(x) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.2)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(net(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, held-out acc {accuracy(net, xt, yt):.4f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    acc = accuracy(net, xt, yt)
    meta = {"architecture_version": DIGIT_CLASSIFIER_ARCH_VERSION, "architecture": "DigitClassifier",
            "test_accuracy": round(acc, 4), "test_set": "spoken digits, held-out voices", "epochs": args.epochs,
            "train_clips": len(x), "test_clips": len(xt), "seed": args.seed, "train_seconds": round(seconds),
            "dtype": "float16", "torch": torch.__version__, "script": "scripts/train_audio_classifier.py"}
    save_state(args.out, half, meta)
    print(f"held-out-voice accuracy {acc:.4f} (float16 weights); {seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
