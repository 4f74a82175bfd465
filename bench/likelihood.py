"""The likelihood figures of docs/benchmarks.md: bits/dim of a model on the bundled test split, and the
error of the strided VLB grid against all T steps (paired: the same images, the same z ~ q(z|x)).

    python bench/likelihood.py --model pretrained:fashion-mnist --n 300 --grid-steps 100 --ref-n 50 --out lik.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from latentdiff.data import load_dataset
from latentdiff.evaluation.likelihood import evaluate_likelihood, format_likelihood_table
from latentdiff.pipeline import LatentDiffusion


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pretrained:fashion-mnist")
    p.add_argument("--n", type=int, default=300, help="test images for the bound")
    p.add_argument("--grid-steps", type=int, default=100)
    p.add_argument("--variance", default="large")
    p.add_argument("--fit-images", type=int, default=1000, help="bundled training images for the decoder's scale")
    p.add_argument("--ode-images", type=int, default=16)
    p.add_argument("--ode-steps", type=int, default=25)
    p.add_argument("--ref-n", type=int, default=50, help="images for the full-T reference (0: skip)")
    p.add_argument("--ref-grids", type=int, nargs="*", default=[10, 25], help="more strided grids on the reference images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    pipe = LatentDiffusion.load(a.model)
    test = load_dataset("bundled", "test", limit=a.n).images
    train = load_dataset("bundled", "train", limit=a.fit_images).images
    common = {"train_images": train, "variance": a.variance, "seed": a.seed}
    out = {"threads": torch.get_num_threads(), "model": a.model}
    out["main"] = evaluate_likelihood(pipe, test, grid_steps=a.grid_steps, ode_images=a.ode_images,
                                      ode_steps=a.ode_steps, **common)
    print(format_likelihood_table(out["main"]), f"\n{out['main']['seconds']:.0f} s", flush=True)
    if a.ref_n:
        sub = test[:a.ref_n]
        runs = {g: evaluate_likelihood(pipe, sub, grid_steps=g, **common) for g in sorted({*a.ref_grids, a.grid_steps})}
        runs[None] = evaluate_likelihood(pipe, sub, grid_steps=None, **common)
        full = runs[None]
        out["reference"] = {str(g or "full"): {"latent_vlb": r["latent_vlb"]["latent_vlb"], "bits_per_dim": r["bits_per_dim"],
                                               "seconds": r["seconds"]} for g, r in runs.items()}
        for g, r in runs.items():
            d = r["latent_vlb"]["latent_vlb"]["mean"] - full["latent_vlb"]["latent_vlb"]["mean"]
            se = math.hypot(r["latent_vlb"]["latent_vlb"]["se"], full["latent_vlb"]["latent_vlb"]["se"])
            out["reference"][str(g or "full")]["minus_full_nats_per_latent_dim"] = {"mean": d, "se_upper": se}
            print(f"grid {g or 'full'}: latent VLB {r['latent_vlb']['latent_vlb']['mean']:.4f} nats/dim, "
                  f"bits/dim {r['bits_per_dim']:.4f}, minus full {d:+.4f}, {r['seconds']:.0f} s", flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
