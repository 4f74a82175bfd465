"""The `latentdiff` command: one subcommand per user task.

Every user error (bad option, missing file, invalid config) prints one line starting with
``latentdiff: error:`` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from latentdiff import __version__
from latentdiff.errors import ConfigError, LatentDiffError
from latentdiff.utils.logs import configure_logging
from latentdiff.utils.progress import progress_bar


class _LazyNames:
    """argparse `choices` read from a registry on first use: building the parser must not import torch
    (`latentdiff --help` stays fast), yet the names come from the registry, so new samplers appear."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def _names(self) -> tuple[str, ...]:
        from importlib import import_module

        return tuple(getattr(import_module(self.module, __package__), self.attribute))

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


SAMPLER_NAMES = _LazyNames("latentdiff.sampling.samplers", "SAMPLERS")  # ddpm, ddim, euler, heun, dpmpp-2m, dpmpp-2m-sde, unipc
SPACING_NAMES = _LazyNames("latentdiff.diffusion.schedule", "ALL_SPACINGS")
COMPILE_MODES = _LazyNames("latentdiff.pipeline.model", "COMPILE_MODES")
PRECISIONS = _LazyNames("latentdiff.pipeline.config", "PRECISIONS")


def one_line(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\n, \\x1b, ...): a message that quotes a
    file name or option value stays on one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        sys.stderr.write(f"latentdiff: error: {one_line(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def bounded(cast, low=None, high=None, *, open_low: bool = False, requirement: str):
    """An argparse type: parse with `cast` (int or float), then require low <= value <= high
    (low < value when `open_low`); `requirement` is the message's "must be …" part."""
    kind = "an integer" if cast is int else "a number"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value > low if open_low else value >= low)) \
            and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_positive_int = bounded(int, 1, requirement="must be a positive integer")
_count = bounded(int, 1, 1_000_000, requirement="must be a positive integer (at most 1000000)")
_seed = bounded(int, 0, 2**63 - 1, requirement="must be between 0 and 2^63-1")
MAX_GRID = 10_000  # images in one PNG grid; more go to an .npz
_nonneg_int = bounded(int, 0, requirement="must be >= 0")
_nonneg_float = bounded(float, 0, requirement="must be a finite number >= 0")
_unit_float = bounded(float, 0, 1, requirement="must be between 0 and 1")


def _add_config_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("configuration (a preset or YAML file, then overrides)")
    g.add_argument("--config", metavar="YAML", help="YAML config file (see configs/); may name a `preset:`")
    g.add_argument("--preset", choices=("demo", "fashion-mnist", "tiny", "default"),
                   help="start from a named preset instead of / below the YAML file (default: default)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set training.lr=5e-4 (repeatable)")
    g.add_argument("--run-dir", default="runs/latentdiff", metavar="DIR",
                   help="where checkpoints, samples and the final model go (default: runs/latentdiff)")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in RUN_DIR")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds another run's checkpoints of this stage (deletes them)")
    g.add_argument("--data", metavar="SOURCE",
                   help="'bundled' (packaged 10k subset), 'fashion-mnist' (full IDX files) or a folder of images")
    g.add_argument("--data-dir", metavar="DIR", help="directory holding the four Fashion-MNIST IDX .gz files")
    g.add_argument("--image-size", type=_positive_int, metavar="N", help="resize images to N×N")
    g.add_argument("--steps", type=_positive_int, metavar="N", help="training steps for this stage")
    g.add_argument("--batch-size", type=_positive_int, metavar="N", help="global batch size for this stage")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default: auto)")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def _load_cfg(args, stage_key: str):
    from latentdiff.pipeline.config import load_config

    over = list(args.overrides)
    if args.data:
        over.append(f"data.source={args.data}")
    if args.data_dir:
        over.append(f"data.data_dir={args.data_dir}")
    if args.image_size:
        over.append(f"data.image_size={args.image_size}")
    if args.steps:
        over.append(f"{stage_key}.steps={args.steps}")
    if args.batch_size:
        over.append(f"{stage_key}.batch_size={args.batch_size}")
    if args.device:
        over.append(f"device={args.device}")
    return load_config(args.config, args.preset, over)


@contextlib.contextmanager
def _process_group():
    """Training commands run under torchrun too: leave the process group on the way out."""
    from latentdiff.training.distributed import shutdown

    try:
        yield
    finally:
        shutdown()


def cmd_train_autoencoder(args):
    from latentdiff.training.autoencoder import train_autoencoder

    cfg = _load_cfg(args, "autoencoder_training")
    with _process_group():
        train_autoencoder(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)


def cmd_train(args):
    from latentdiff.training.diffusion import train_diffusion

    cfg = _load_cfg(args, "training")
    with _process_group():
        train_diffusion(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress)


def cmd_sample(args):
    import numpy as np

    from latentdiff.pipeline.model import LatentDiffusion, resolve_device
    from latentdiff.utils.files import check_output, check_output_dir
    from latentdiff.utils.images import save_individual, save_samples

    out = check_output(args.out, (".png", ".npz"))
    if out.suffix.lower() == ".png" and args.n > MAX_GRID:
        raise ConfigError(f"--out {out}: a PNG grid holds at most {MAX_GRID} images; write --n {args.n} to an .npz")
    if args.save_individual:
        check_output_dir(args.save_individual, option="--save-individual")
    pipe = LatentDiffusion.load(args.model, resolve_device(args.device))
    num_classes = pipe.num_classes
    if args.classifier_scale:
        if args.unconditional:
            raise ConfigError("--unconditional cannot be combined with --classifier-scale, which guides towards "
                              "classes; for the unconditional denoiser plus classifier guidance use --guidance 0")
        num_classes = pipe.load_classifier(args.classifier).num_classes
    elif args.classifier:
        raise ConfigError("--classifier only applies with --classifier-scale")
    labels = None
    if args.class_ is not None:
        labels = np.full(args.n, args.class_)
    elif num_classes and not args.unconditional:
        labels = np.arange(args.n) % num_classes  # every class in turn
    bar = progress_bar(args.n, "sampling", not args.no_progress)
    t0 = time.perf_counter()
    images, used = pipe.generate(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, labels=labels,
                                 guidance=args.guidance, eta=args.eta, batch_size=args.batch_size,
                                  spacing=args.spacing, compile=args.compile, precision=args.precision,
                                  classifier_scale=args.classifier_scale, progress=bar.update if bar else None)
    dt = time.perf_counter() - t0
    if bar:
        bar.close()
    meta = {"Software": f"latentdiff {__version__}",
            "latentdiff": {"model": str(args.model), "sampler": args.sampler or pipe.cfg.sample.sampler,
                           "steps": args.steps or pipe.cfg.sample.steps, "spacing": args.spacing or "trailing",
                           "seed": args.seed, "precision": args.precision,
                           "guidance": pipe.cfg.sample.guidance if args.guidance is None else args.guidance,
                           "classifier_scale": args.classifier_scale, "class": args.class_, "synthetic": True}}
    nrow = num_classes if (used is not None and args.class_ is None and args.n % num_classes == 0) else None
    save_samples(images, out, used, meta, nrow=nrow)
    if args.save_individual:
        save_individual(images, args.save_individual, meta)
    print(f"wrote {len(images)} images to {out} ({len(images) / dt:.1f} images/s on {pipe.device})")


def cmd_train_classifier(args):
    import dataclasses

    import torch

    from latentdiff.models.classifier import CLASSIFIER_FILE
    from latentdiff.pipeline.model import LatentDiffusion, resolve_device
    from latentdiff.training.classifier import default_training, train_classifier

    if args.out is None and str(args.model).startswith("pretrained:"):
        raise ConfigError(f"{args.model} is part of the installed package: give --out PATH for the classifier "
                          "(and use it with `latentdiff sample --classifier PATH`)")
    device = resolve_device(args.device)
    pipe = LatentDiffusion.load(args.model, device)
    out = Path(args.out) if args.out else pipe.directory / CLASSIFIER_FILE
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out}")
    train = default_training()
    train = dataclasses.replace(train, **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                                              ("lr", args.lr), ("seed", args.seed)) if v is not None})
    train_classifier(pipe, args.run_dir, out, source=args.data, data_dir=args.data_dir, train=train, device=device,
                     dtype=getattr(torch, args.dtype),
                     resume=args.resume, overwrite=args.overwrite, limit=args.limit, progress=not args.no_progress)


def cmd_demo(args):
    from latentdiff.pipeline.config import load_config
    from latentdiff.training.autoencoder import train_autoencoder
    from latentdiff.training.diffusion import train_diffusion
    from latentdiff.training.distributed import is_main

    over = [f"device={args.device}"] if args.device else []
    cfg = load_config(preset="demo", overrides=over)
    t0 = time.perf_counter()
    with _process_group():
        # the demo's run directory is its own: without --resume a demo starts over
        train_autoencoder(cfg, args.run_dir, resume=args.resume, overwrite=not args.resume,
                          progress=not args.no_progress)
        pipe = train_diffusion(cfg, args.run_dir, resume=args.resume, overwrite=not args.resume,
                               progress=not args.no_progress,
                               grid_path=args.out)
        if is_main():
            print(f"demo finished in {time.perf_counter() - t0:.0f} s: {args.out} (one row per class: "
                  f"{', '.join(pipe.class_names)}); model in {args.run_dir}")


def cmd_download(args):
    from latentdiff.data.datasets import download_fashion_mnist

    path = download_fashion_mnist(args.dest, progress=not args.no_progress)
    print(f"Fashion-MNIST is in {path}")


def cmd_info(args):
    from latentdiff.pipeline.model import LatentDiffusion

    pipe = LatentDiffusion.load(args.model)
    n_ae = sum(p.numel() for p in pipe.autoencoder.parameters())
    n_den = sum(p.numel() for p in pipe.denoiser.parameters())
    print(json.dumps({"image_shape": pipe.image_shape, "latent_shape": pipe.autoencoder.latent_shape,
                      "classes": list(pipe.class_names), "autoencoder_parameters": n_ae,
                      "denoiser_parameters": n_den, "scale_factor": float(pipe.autoencoder.scale_factor),
                      "prediction": pipe.denoiser.prediction, "schedule": pipe.cfg.diffusion.schedule,
                      "num_train_steps": pipe.cfg.diffusion.num_train_steps}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentdiff", description="Latent diffusion models: train an autoencoder, train a "
                     "diffusion model in its latent space, and sample from it.",
                     epilog="Quick start: `latentdiff demo`, then `latentdiff sample --model "
                            "pretrained:fashion-mnist --n 64 --out samples.png`.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="train a small model on the bundled data (CPU, minutes) and write samples.png",
                       description="Train a small autoencoder and class-conditional latent diffusion model on the "
                                   "bundled Fashion-MNIST subset, then write a grid of samples (one row per class).")
    p.add_argument("--out", default="samples.png", help="where the sample grid goes (default: samples.png)")
    p.add_argument("--run-dir", default="demo-run", help="where the demo model goes (default: demo-run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run (else it starts over)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-autoencoder", help="stage 1: train the KL autoencoder (reports PSNR/SSIM)",
                       description="Train the KL-regularised autoencoder on images, estimate the latent scale "
                                   "factor, and report PSNR/SSIM on the held-out split. Writes "
                                   "RUN_DIR/autoencoder.safetensors.")
    _add_config_options(p)
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("train", help="stage 2: train the latent diffusion model (needs stage 1 in RUN_DIR)",
                       description="Train the U-Net denoiser on latents of the frozen autoencoder in RUN_DIR. "
                                   "When it finishes, RUN_DIR is a model directory usable with `sample --model`.")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from a trained model",
                       description="Generate images. --out FILE.png writes a grid; --out FILE.npz writes uint8 "
                                   "`images` (N×H×W or N×H×W×C) and `labels` for conditional models.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a model directory, or pretrained:NAME (e.g. pretrained:fashion-mnist)")
    p.add_argument("--n", type=_count, default=64, help="number of images (default: 64)")
    p.add_argument("--steps", type=_positive_int, help="sampling steps (default: the model's, e.g. 50)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME",
                   help="one of %(choices)s (default: the model's); heun costs two network evaluations "
                        "per step, the others one")
    p.add_argument("--spacing", choices=SPACING_NAMES, metavar="NAME",
                   help="timestep grid: one of %(choices)s (default: trailing)")
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES, metavar="MODE",
                   help="run the U-Net through torch.compile; MODE is one of %(choices)s (default: default; "
                        "reduce-overhead adds CUDA graphs on a GPU). Pays off for many batches; falls back to eager")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", metavar="P",
                   help="network arithmetic, one of %(choices)s: auto (bf16 autocast on CUDA, float32 on CPU), "
                        "bf16 or fp32 (default: auto)")
    p.add_argument("--eta", type=_unit_float, default=0.0, help="DDIM stochasticity η in [0, 1] (default: 0)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed; same seed, same images (default: 0)")
    p.add_argument("--class", dest="class_", type=_nonneg_int, metavar="K",
                   help="generate only class K (conditional models); default: all classes in turn")
    p.add_argument("--unconditional", action="store_true", help="ignore classes (null label) on a conditional model")
    p.add_argument("--guidance", type=_nonneg_float, help="classifier-free guidance scale (1 = none; default: model's)")
    p.add_argument("--classifier-scale", type=_nonneg_float, default=0.0, metavar="S",
                   help="classifier guidance scale with the model's noise-aware classifier (0 = none; default: 0)")
    p.add_argument("--classifier", metavar="PATH",
                   help="classifier file for --classifier-scale (default: MODEL_DIR/classifier.safetensors)")
    p.add_argument("--out", default="samples.png", help=".png grid or .npz archive (default: samples.png)")
    p.add_argument("--save-individual", metavar="DIR", help="also write one PNG per image into DIR")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default: 256)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-classifier", help="train a noise-aware classifier for classifier guidance",
                       description="Train a classifier of noisy latents p(y | z_t, t) on the model's data (encoded "
                                   "with its autoencoder, noised to uniform t), report its held-out accuracy per "
                                   "noise level, and write MODEL_DIR/classifier.safetensors (or --out). Use it with "
                                   "`latentdiff sample --classifier-scale S`.")
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory or pretrained:NAME")
    p.add_argument("--out", metavar="PATH", help="where the classifier goes (default: MODEL_DIR/classifier."
                   "safetensors; required for pretrained models)")
    p.add_argument("--data", metavar="SOURCE", help="labelled training data: 'bundled', 'fashion-mnist' or a folder "
                   "with one subfolder per class (default: the model's training data)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the four Fashion-MNIST IDX .gz files")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N training images")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="training steps (default: 2000)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="batch size (default: 128)")
    p.add_argument("--lr", type=bounded(float, 0, 1, open_low=True, requirement="must be in (0, 1]"),
                   help="peak learning rate (default: 2e-3)")
    p.add_argument("--seed", type=int, help="training seed (default: 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the saved weights; accuracy is measured with them (default: float32)")
    p.add_argument("--run-dir", default="runs/classifier", metavar="DIR",
                   help="where resumable checkpoints go (default: runs/classifier)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in RUN_DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a RUN_DIR that holds another run's classifier checkpoints (deletes them)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("download", help="download the full Fashion-MNIST (checksum-verified)",
                       description="Download the four official Fashion-MNIST IDX files, verify their MD5 "
                                   "checksums, and store them in DEST (default: the latentdiff cache directory).")
    p.add_argument("dataset", choices=("fashion-mnist",), help="data set to download")
    p.add_argument("--dest", help="target directory (default: cache directory)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("info", help="describe a model directory", description="Print a model's shapes and settings.")
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory or pretrained:NAME")
    p.set_defaults(func=cmd_info)

    from latentdiff.cli.eval import register as register_eval_commands
    register_eval_commands(sub)
    from latentdiff.cli.control import register as register_control_commands
    register_control_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except LatentDiffError as e:
        sys.stderr.write(f"latentdiff: error: {one_line(str(e))}\n")
        return 2
    except OSError as e:  # the environment (permissions, disk full), not a bug: one line, no traceback
        sys.stderr.write(f"latentdiff: error: {one_line(str(e))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("latentdiff: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
