"""Training commands: demo, train-autoencoder, train (the latent denoiser), train-classifier.

All of them run under torchrun too (`torchrun --nproc-per-node N -m latentdiff train ...`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from latentdiff.cli.options import (
    POSITIVE,
    SEED,
    Bounded,
    OneOf,
    command,
    config_fields,
    config_options,
    device_option,
    model_option,
    no_progress_option,
    overwrite_option,
    resume_option,
    with_namespace,
)
from latentdiff.errors import ConfigError


@contextlib.contextmanager
def _process_group():
    """Training commands run under torchrun too: leave the process group on the way out."""
    from latentdiff.training.distributed import shutdown

    try:
        yield
    finally:
        shutdown()


def _load_cfg(opts, stage_key: str):
    """The config: preset/YAML, then --set (YAML values), then the typed flags, set as given."""
    from latentdiff.pipeline.config import load_config

    return load_config(opts.config, opts.preset, list(opts.overrides), fields=config_fields(opts, stage_key))


@command("demo", help="Train a small autoencoder and class-conditional latent diffusion model on the bundled "
                            "Fashion-MNIST subset, then write a grid of samples (one row per class).")
@click.option("--out", default="samples.png", metavar="PATH", help="where the sample grid goes (default: samples.png)")
@click.option("--run-dir", default="demo-run", metavar="DIR", help="where the demo model goes (default: demo-run)")
@device_option(None, "where to train (default: auto)")
@resume_option("continue an interrupted demo run (else it starts over)")
@no_progress_option("plain log lines instead of progress bars")
@with_namespace
def demo(opts):
    from latentdiff.pipeline.config import load_config
    from latentdiff.training.autoencoder import train_autoencoder
    from latentdiff.training.diffusion import train_diffusion
    from latentdiff.training.distributed import is_main

    cfg = load_config(preset="demo", fields={"device": opts.device} if opts.device else None)
    t0 = time.perf_counter()
    progress = not opts.no_progress
    fresh = not opts.resume  # the demo's run directory is its own: without --resume a demo starts over
    with _process_group():
        train_autoencoder(cfg, opts.run_dir, resume=opts.resume, overwrite=fresh, progress=progress)
        pipe = train_diffusion(cfg, opts.run_dir, resume=opts.resume, overwrite=fresh, progress=progress,
                               grid_path=opts.out)
        if is_main():
            print(f"demo finished in {time.perf_counter() - t0:.0f} s: {opts.out} (one row per class: "
                  f"{', '.join(pipe.class_names)}); model in {opts.run_dir}")


@command("train-autoencoder", help="Train the KL-regularised autoencoder on images, estimate the latent scale "
               "factor, and report PSNR/SSIM on the held-out split. Writes RUN_DIR/autoencoder.safetensors. The "
               "config is a preset or YAML file, then --set overrides, then the other flags.")
@config_options()
@with_namespace
def train_autoencoder(opts):
    from latentdiff.training.autoencoder import train_autoencoder as run

    cfg = _load_cfg(opts, "autoencoder_training")
    with _process_group():
        run(cfg, opts.run_dir, resume=opts.resume, overwrite=opts.overwrite, progress=not opts.no_progress)


@command("train", help="Train the U-Net denoiser on latents of the frozen autoencoder in RUN_DIR. When it "
               "finishes, RUN_DIR is a model directory usable with `sample --model`. The config is a preset or "
               "YAML file, then --set overrides, then the other flags.")
@config_options()
@with_namespace
def train(opts):
    from latentdiff.training.diffusion import train_diffusion

    cfg = _load_cfg(opts, "training")
    with _process_group():
        train_diffusion(cfg, opts.run_dir, resume=opts.resume, overwrite=opts.overwrite, progress=not opts.no_progress)


def _classifier_out(opts, pipe) -> Path:
    from latentdiff.models.classifier import CLASSIFIER_FILE

    out = Path(opts.out) if opts.out else pipe.directory / CLASSIFIER_FILE
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    return out


def _classifier_training(opts):
    """The classifier's training defaults with the flags that were given."""
    import dataclasses

    from latentdiff.training.classifier import default_training

    given = {"steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed}
    return dataclasses.replace(default_training(), **{k: v for k, v in given.items() if v is not None})


@command("train-classifier", help="Train a classifier of noisy latents p(y | z_t, t) on the model's data "
               "(encoded with its autoencoder, noised to uniform t), report its held-out accuracy per noise level, "
               "and write MODEL_DIR/classifier.safetensors (or --out). Use it with "
               "`latentdiff sample --classifier-scale S`.")
@model_option(help="a model directory or pretrained:NAME")
@click.option("--out", metavar="PATH", help="where the classifier goes (default: MODEL_DIR/classifier.safetensors; "
              "required for pretrained models)")
@click.option("--data", metavar="SOURCE", help="labelled training data: 'bundled', 'fashion-mnist' or a folder "
              "with one subfolder per class (default: the model's training data)")
@click.option("--data-dir", metavar="DIR", help="directory holding the four Fashion-MNIST IDX .gz files")
@click.option("--limit", type=POSITIVE, metavar="N", help="use only the first N training images")
@click.option("--steps", type=POSITIVE, metavar="N", help="training steps (default: 2000)")
@click.option("--batch-size", type=POSITIVE, metavar="N", help="batch size (default: 128)")
@click.option("--lr", type=Bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]"), metavar="LR",
              help="peak learning rate (default: 2e-3)")
@click.option("--seed", type=SEED, help="training seed (default: 0)")
@click.option("--dtype", type=OneOf(("float32", "float16")), default="float32",
              help="precision of the saved weights; accuracy is measured with them (default: float32)")
@click.option("--run-dir", default="runs/classifier", metavar="DIR",
              help="where resumable checkpoints go (default: runs/classifier)")
@resume_option()
@overwrite_option("classifier")
@device_option()
@no_progress_option()
@with_namespace
def train_classifier(opts):
    import torch

    from latentdiff.pipeline import LatentDiffusion, resolve_device
    from latentdiff.training.classifier import train_classifier as run

    if opts.out is None and str(opts.model).startswith("pretrained:"):
        raise ConfigError(f"{opts.model} is part of the installed package: give --out PATH for the classifier "
                          "(and use it with `latentdiff sample --classifier PATH`)")
    device = resolve_device(opts.device)
    pipe = LatentDiffusion.load(opts.model, device)
    run(pipe, opts.run_dir, _classifier_out(opts, pipe), source=opts.data, data_dir=opts.data_dir,
        train=_classifier_training(opts), device=device, dtype=getattr(torch, opts.dtype), resume=opts.resume,
        overwrite=opts.overwrite, limit=opts.limit, progress=not opts.no_progress)
