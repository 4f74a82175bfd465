"""Commands about models and data on disk: info (describe a model), download (the full Fashion-MNIST, the emoji set)."""

from __future__ import annotations

import json

import click

from latentdiff.cli.options import OneOf, argument, command, model_option, no_progress_option, with_namespace


@command("info", help="Print a model's shapes and settings as JSON.")
@model_option(help="a model directory or pretrained:NAME")
@with_namespace
def info(opts):
    from latentdiff.pipeline import LatentDiffusion

    pipe = LatentDiffusion.load(opts.model)
    n_ae = sum(p.numel() for p in pipe.autoencoder.parameters())
    n_den = sum(p.numel() for p in pipe.denoiser.parameters())
    print(json.dumps({"image_shape": pipe.image_shape, "latent_shape": pipe.autoencoder.latent_shape,
                      "classes": list(pipe.class_names), "autoencoder_parameters": n_ae,
                      "denoiser_parameters": n_den, "latent_stats": pipe.autoencoder.latent_stats(),
                      "prediction": pipe.denoiser.prediction, "schedule": pipe.cfg.diffusion.schedule,
                      "num_train_steps": pipe.cfg.diffusion.num_train_steps}, indent=2))


@command("download", help="Download a data set into DEST (default: the latentdiff cache directory). fashion-mnist: "
                           "the four official IDX files, MD5-verified. emoji: the 3,786 Noto emoji images of npm "
                           "emoji-datasource-google 16.0.0 via `npm pack` (SHA-256-verified), or, without npm, rendered "
                           "from Debian's fonts-noto-color-emoji; prepared with captions and a fixed held-out split.")
@argument("dataset", type=OneOf(("fashion-mnist", "emoji")), metavar="DATASET",
          help="data set to download: fashion-mnist or emoji")
@click.option("--dest", metavar="DIR", help="target directory (default: cache directory)")
@no_progress_option("no progress bar")
@with_namespace
def download(opts):
    if opts.dataset == "emoji":
        from latentdiff.data.emoji_download import download_emoji

        path = download_emoji(opts.dest, progress=not opts.no_progress)
        print(f"the emoji set is in {path}")
        return
    from latentdiff.data import download_fashion_mnist

    path = download_fashion_mnist(opts.dest, progress=not opts.no_progress)
    print(f"Fashion-MNIST is in {path}")
