"""Turn a finished training run into a shipped pretrained model (float16 safetensors).

    python scripts/package_pretrained.py RUN_DIR NAME [--note "trained on ..."]

Writes src/latentdiff/pretrained/NAME/ (config.json, autoencoder.safetensors, denoiser.safetensors,
model_card.md), then reloads it and checks that float16 storage changed the samples little.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentdiff.pipeline import LatentDiffusion
from latentdiff.pipeline.directory import default_card
from latentdiff.utils.state import load_state

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("name")
    p.add_argument("--note", default="", help="a line about how and where it was trained, for the model card")
    args = p.parse_args()
    run = Path(args.run_dir)
    pipe = LatentDiffusion.load(run)
    meta = json.loads((run / "config.json").read_text())
    _, ae_meta = load_state(run / "autoencoder.safetensors")
    out = ROOT / "src" / "latentdiff" / "pretrained" / args.name
    card = default_card(meta)
    if args.note:
        card = card.replace("## Intended use", f"## Training\n\n{args.note}\n\n## Intended use")
    extra = {k: meta[k] for k in ("train_steps", "autoencoder_steps", "data_source", "metrics") if k in meta}
    pipe.save(out, card=card, dtype=torch.float16, extra=extra, autoencoder_meta=ae_meta)
    shipped = LatentDiffusion.load(f"pretrained:{args.name}")
    labels = np.arange(20) % max(pipe.num_classes, 1) if pipe.num_classes else None
    a, _ = pipe.generate(20, labels=labels, seed=0)
    b, _ = shipped.generate(20, labels=labels, seed=0)
    diff = np.abs(a.astype(int) - b.astype(int)).mean()
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.1f} MB); mean |float32 - float16 sample| = {diff:.2f} grey levels")


if __name__ == "__main__":
    main()
