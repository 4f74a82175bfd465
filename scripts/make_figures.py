"""Regenerate the README pictures of every feature with the shipped model, on the CPU (a minute or two).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/make_figures.py [--out docs/img] [--scale 3]

Uses `pretrained:fashion-mnist` and real Fashion-MNIST test images from the bundled subset. Every
picture is made by the library function behind the CLI command shown next to it in the README,
with the same seed, so the commands reproduce them; the input images are written beside the
pictures (`in-*.png`, 28×28) so that those commands can be run as printed. Everything is
deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from latentdiff.data import load_dataset
from latentdiff.diffusion.cond import Cond
from latentdiff.guidance.cfg import classifier_free
from latentdiff.guidance.gradient import brightness, decoded, user_guidance
from latentdiff.pipeline import LatentDiffusion, control
from latentdiff.pipeline import inpaint as inpaint_mod
from latentdiff.sampling.samplers import sample
from latentdiff.utils.images import make_grid, save_png, to_pil, to_uint8

MODEL = "pretrained:fashion-mnist"
RECT = (3, 2, 17, 16)  # x0, y0, x1, y1 of the inpainting hole, as `latentdiff inpaint --rect` takes it
CLASSES = np.arange(10)


def pick(test, label: int, nth: int = 0) -> np.ndarray:
    """The nth bundled test image of a class, uint8 1×28×28×1."""
    idx = np.flatnonzero(test.labels == label)[nth]
    return test.images[idx:idx + 1]


def damage(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Salt-and-pepper specks (2% of pixels) and one bright diagonal scratch."""
    rng = np.random.default_rng(seed)
    out = image.copy()
    specks = rng.random(out.shape[1:3]) < 0.02
    out[0][specks] = rng.choice([0, 255], size=(int(specks.sum()), 1))
    for i in range(4, 24):
        out[0, i, i // 2 + 6] = 255
    return out


def brightness_rows(pipe, labels, targets, scale: float, seed: int) -> np.ndarray:
    """The same seeds sampled plainly and with brightness guidance towards each target (in [-1, 1])."""
    schedule, rows = pipe.denoiser.schedule, []
    noise = torch.randn((len(labels), *pipe.autoencoder.latent_shape),
                        generator=torch.Generator().manual_seed(seed))
    base = classifier_free(pipe.denoiser, Cond(labels=torch.as_tensor(labels)), pipe.cfg.sample.guidance)
    for target in targets:
        fn = base if target is None else user_guidance(base, decoded(pipe.autoencoder, brightness(target)), scale,
                                                       schedule)
        z0 = sample(fn, noise, schedule, sampler="ddim", steps=pipe.cfg.sample.steps,
                    generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            rows.append(to_uint8(pipe.autoencoder.from_latent(z0)))
    return np.concatenate(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    p.add_argument("--scale", type=int, default=3, help="nearest-neighbour enlargement of every picture")
    p.add_argument("--classifier-scale", type=float, default=4.0, help="for the classifier-guidance picture")
    p.add_argument("--brightness-scale", type=float, default=30.0, help="for the user-guidance picture")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    out, k = args.out, args.scale
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusion.load(MODEL)
    test = load_dataset("bundled", "test")
    meta = {"Software": "latentdiff scripts/make_figures.py", "latentdiff": {"model": MODEL, "synthetic": True}}

    def save(name: str, images: np.ndarray, nrow: int):
        save_png(make_grid(images, nrow), out / name, meta, scale=k)
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1e3:.0f} kB)")

    def save_input(name: str, image: np.ndarray):
        save_png(image[0], out / name)  # 28×28, the exact bytes the CLI commands read

    # 1. classifier-free guidance: one column per class, rows = guidance 0, 1, 2 (default), 4; same seed
    cfg_rows = [pipe.generate(10, labels=CLASSES, guidance=w, seed=0)[0] for w in (0.0, 1.0, 2.0, 4.0)]
    save("guidance-cfg.png", np.concatenate(cfg_rows), 10)

    # 2. classifier guidance on the unconditional denoiser (CFG scale 0): rows = classifier scale 0, s/2, s
    s = args.classifier_scale
    clf_rows = [pipe.generate(10, labels=CLASSES, guidance=0.0, classifier_scale=c, seed=0)[0] for c in (0, s / 2, s)]
    save("guidance-classifier.png", np.concatenate(clf_rows), 10)

    # 3. user guidance: darker, plain, brighter (objective on the decoded image's mean pixel)
    labels = np.array([0, 1, 2, 3, 4, 6, 8, 9])
    save("guidance-brightness.png", brightness_rows(pipe, labels, (-0.9, None, 0.1), args.brightness_scale, 0),
         len(labels))

    # 4. editing: SDEdit strength sweep, then towards other classes
    shirt, sneaker = pick(test, 0), pick(test, 7)
    save_input("in-tshirt.png", shirt)
    save_input("in-sneaker.png", sneaker)
    sweep = [control.img2img(pipe, shirt, st, seed=0) for st in (0.2, 0.4, 0.6, 0.8, 1.0)]
    save("edit-strength.png", np.concatenate([shirt, *sweep]), 6)
    towards = [control.img2img(pipe, shirt, 0.6, labels=c, seed=0) for c in (2, 3, 4, 6)]
    save("edit-class.png", np.concatenate([shirt, *towards]), 5)

    # 5. inpainting: image, mask (the hole in white), results for three seeds
    boot = pick(test, 9)
    save_input("in-boot.png", boot)
    mask = np.zeros((28, 28), dtype=bool)
    mask[RECT[1]:RECT[3], RECT[0]:RECT[2]] = True  # the shaft of the boot
    results = [inpaint_mod.inpaint(pipe, boot, mask, resample=2, seed=sd) for sd in range(3)]
    shown_mask = np.where(mask[None, ..., None], 255, boot // 3).astype(np.uint8)
    save("inpaint.png", np.concatenate([boot, shown_mask, *results]), 5)

    # 6. repair: damaged, the detected damage, repaired, original
    trouser = pick(test, 1)
    broken = damage(trouser)
    save_input("in-damaged.png", broken)
    fixed, found = inpaint_mod.repair(pipe, broken, seed=0)
    save("repair.png", np.concatenate([broken, np.where(found[..., None], 255, 0).astype(np.uint8), fixed, trouser]),
         4)

    # 7. interpolation between two real images (DDIM inversion + slerp), strip and GIF
    pullover = pick(test, 2)
    save_input("in-pullover.png", pullover)
    frames = control.interpolate_images(pipe, shirt, pullover, 8)
    save("interpolate.png", frames, 8)
    pils = [to_pil(f).resize((28 * k, 28 * k), 0) for f in frames]  # 0: nearest
    pils[0].save(out / "interpolate.gif", format="GIF", save_all=True, append_images=pils[1:], duration=150, loop=0)
    print(f"wrote {out / 'interpolate.gif'} ({(out / 'interpolate.gif').stat().st_size / 1e3:.0f} kB)")

    # 8. combining: A, B, their mix
    mix = control.combine(pipe, np.concatenate([sneaker, boot]), [1, 1], 0.5, seed=0)
    save("combine.png", np.concatenate([sneaker, boot, mix]), 3)


if __name__ == "__main__":
    main()
