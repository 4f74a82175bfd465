"""Commands about models and data on disk: info (describe a model), download (the full Fashion-MNIST, the emoji
set, or the synthesised spoken digits)."""

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
                      "num_train_steps": pipe.cfg.diffusion.num_train_steps,
                      "files": file_integrity(pipe.directory)}, indent=2))


def file_integrity(directory) -> dict[str, str]:
    """Per weight file: "verified" when it carries a latentdiff checksum (checked on load), else "unverified"."""
    from latentdiff.utils.state import is_verified

    return {p.name: "verified (sha256 checksum)" if is_verified(p) else "unverified (no latentdiff checksum)"
            for p in sorted(directory.glob("*.safetensors"))}


@command("download", help="Get a data set into DEST (default: the latentdiff cache directory). fashion-mnist: "
                           "the four official IDX files, MD5-verified. emoji: the 3,786 Noto emoji images of npm "
                           "emoji-datasource-google 16.0.0 via `npm pack` (SHA-256-verified), or, without npm, rendered "
                           "from Debian's fonts-noto-color-emoji; prepared with captions and a fixed held-out split. spoken-digits: "
                          "synthesised with espeak-ng (deterministic from --seed; held-out test voices).")
@argument("dataset", type=OneOf(("fashion-mnist", "emoji", "spoken-digits")), metavar="DATASET",
          help="data set: fashion-mnist, emoji or spoken-digits")
@click.option("--dest", metavar="DIR", help="target directory (default: cache directory)")
@click.option("--n", type=click.IntRange(20, 1_000_000), default=12_000, metavar="N",
              help="spoken-digits: number of clips (default: 12000)")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="spoken-digits: seed (default: 0)")
@click.option("--workers", type=click.IntRange(1, 256), default=2, help="spoken-digits: processes (default: 2)")
@no_progress_option("no progress bar")
@with_namespace
def download(opts):
    if opts.dataset == "emoji":
        from latentdiff.data.emoji_download import download_emoji

        path = download_emoji(opts.dest, progress=not opts.no_progress)
        print(f"the emoji set is in {path}")
        return
    if opts.dataset == "spoken-digits":
        from latentdiff.data.spoken_digits import espeak_binary, generate
        from latentdiff.utils.progress import progress_bar

        espeak_binary()  # the one-line error before anything else
        bar = progress_bar(opts.n, "synthesising", not opts.no_progress, unit="clip")
        try:
            path = generate(opts.dest, n=opts.n, seed=opts.seed, workers=opts.workers,
                            progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        print(f"spoken digits ({opts.n} clips, seed {opts.seed}) are in {path}")
        return
    from latentdiff.data import download_fashion_mnist

    path = download_fashion_mnist(opts.dest, progress=not opts.no_progress)
    print(f"Fashion-MNIST is in {path}")
