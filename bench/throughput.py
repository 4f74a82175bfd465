"""Training and sampling throughput of a model, printed as one JSON object.

    python bench/throughput.py --model pretrained:fashion-mnist [--device cpu] [--n 256] [--steps 20 50]

Training throughput is measured on the model's own networks with its training batch size, on
random latents/images (the data pipeline is a resident tensor index, so this is what training
costs); sampling throughput runs the real sampler end to end, decoding included.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from latentdiff.pipeline import LatentDiffusion, resolve_device
from latentdiff.train import diffusion_loss


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(pipe: LatentDiffusion, device, batch: int, iters: int) -> dict:
    out = {}
    ae = pipe.autoencoder.train()
    x = torch.rand(batch, *pipe.image_shape, device=device) * 2 - 1
    for name, step in (("autoencoder", lambda: ae.loss(x)[0].mean()),
                       ("denoiser", lambda: diffusion_loss(pipe.denoiser, torch.randn(
                           batch, *ae.latent_shape, device=device), None, gen, 5.0).mean())):
        gen = torch.Generator(device=device).manual_seed(0)
        params = ae.parameters() if name == "autoencoder" else pipe.denoiser.parameters()
        opt = torch.optim.AdamW(params, lr=1e-4)
        for i in range(iters + 2):  # two warm-up iterations
            if i == 2:
                sync(device)
                t0 = time.perf_counter()
            loss = step()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(device)
        out[f"{name}_train_images_per_s"] = round(batch * iters / (time.perf_counter() - t0), 1)
    pipe.eval()
    return out


def sample_throughput(pipe: LatentDiffusion, n: int, steps_list, sampler: str, guidance: float) -> dict:
    out = {}
    labels = (torch.arange(n) % pipe.num_classes).numpy() if pipe.num_classes else None
    pipe.generate(min(n, 8), steps=2, sampler=sampler, labels=None if labels is None else labels[:8])  # warm-up
    for steps in steps_list:
        sync(pipe.device)
        t0 = time.perf_counter()
        pipe.generate(n, steps=steps, sampler=sampler, labels=labels, guidance=guidance)
        sync(pipe.device)
        out[f"{sampler}_{steps}_steps_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained:fashion-mnist")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=256, help="images per sampling measurement")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--train-iters", type=int, default=10)
    args = p.parse_args()
    device = resolve_device(args.device)
    pipe = LatentDiffusion.load(args.model, device)
    guidance = pipe.cfg.sample.guidance if args.guidance is None else args.guidance
    result = {"model": args.model, "machine": machine(device), "torch": torch.__version__,
              "guidance": guidance, "n": args.n}
    result.update(train_throughput(pipe, device, pipe.cfg.training.batch_size, args.train_iters))
    result.update(sample_throughput(pipe, args.n, args.steps, args.sampler, guidance))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
