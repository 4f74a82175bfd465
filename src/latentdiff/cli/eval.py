"""Evaluation: Fréchet distance beside its real-vs-real floor, k-NN precision/recall, class accuracy, PSNR/SSIM.

Every distribution metric is computed in the feature space of a named extractor (see
:mod:`latentdiff.features`); numbers from different extractors are not comparable, so each
result names its extractor. "FD" is FID only with the standard Inception weights.

The floor answers "how small can FD be with this many images?": the FD between an equally sized
set of *real* training images and the same test split. A model whose FD is near the floor is as
close to the data as a finite real sample is.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from latentdiff.errors import ConfigError, DataError
from latentdiff.evaluation.evaluate import (
    DEFAULT_EXTRACTOR,
    EXTRACTOR_NAMES,
    REFERENCES,
    _check_count,
    evaluate_autoencoder,
    evaluate_samples,
    load_samples,
    preflight,
)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _print_table(title: str, rows: list[tuple[str, object, object]], result: dict, as_json: bool) -> None:
    """A human table (metric, value, floor) and, with --json, all results as one JSON object on the last line."""
    def fmt(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    width = max(len("metric"), *(len(name) for name, _, _ in rows))
    print(title)
    print(f"  {'metric':<{width}}  {'value':>10}  {'real data':>10}")
    for name, value, floor in rows:
        print(f"  {name:<{width}}  {fmt(value):>10}  {fmt(floor):>10}")
    for note in result.get("notes", ()):
        print(f"  note: {note}")
    if as_json:
        print(json.dumps({k: _finite(v) for k, v in result.items()}))


def cmd_eval(args) -> None:
    from latentdiff.pipeline.model import LatentDiffusion, resolve_device

    device = resolve_device(args.device)
    options = dict(reference=args.reference, extractor=args.extractor, weights=args.inception_weights, k=args.k,
                   device=device, batch_size=args.batch_size, data_dir=args.data_dir)
    if args.extractor != "inception" and args.inception_weights:
        raise ConfigError("--inception-weights only applies with --extractor inception")
    if args.samples:
        given = [f"--{o}" for o in ("sampler", "steps", "spacing", "guidance") if getattr(args, o) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --model (they control sampling)")
        images, labels = load_samples(args.samples)
        if args.n is not None:
            if args.n > len(images):
                raise DataError(f"--n {args.n} but {args.samples} holds only {len(images)} images")
            images, labels = images[:args.n], (None if labels is None else labels[:args.n])
        source, extra = f"{args.samples}", {"samples": str(args.samples)}
    else:
        from latentdiff.utils.progress import progress_bar

        n = args.n or 10_000
        from latentdiff.evaluation.features import EXTRACTORS

        _check_count(n, EXTRACTORS[args.extractor], "images")  # before loading the model
        pipe = LatentDiffusion.load(args.model, device)
        c, h, w = pipe.image_shape
        preflight(n, args.extractor, args.reference, args.data_dir, (h, w, c))  # before minutes of sampling
        labels = np.arange(n) % pipe.num_classes if pipe.num_classes else None  # every class in turn
        bar = progress_bar(n, "sampling", not args.no_progress)
        t0 = time.perf_counter()
        images, labels = pipe.generate(n, sampler=args.sampler, steps=args.steps, seed=args.seed, labels=labels,
                                       guidance=args.guidance, batch_size=args.batch_size, spacing=args.spacing,
                                       progress=bar.update if bar else None)
        if bar:
            bar.close()
        extra = {"model": str(args.model), "sampler": args.sampler or pipe.cfg.sample.sampler,
                 "steps": args.steps or pipe.cfg.sample.steps, "spacing": args.spacing or "trailing",
                 "seed": args.seed,
                 "guidance": pipe.cfg.sample.guidance if args.guidance is None else args.guidance,
                 "sample_seconds": round(time.perf_counter() - t0, 2)}
        source = (f"{args.model} ({extra['sampler']}, {extra['steps']} {extra['spacing']} steps, "
                  f"guidance {extra['guidance']}, seed {args.seed})")
    result = {**evaluate_samples(images, labels, **options), **extra}
    rows = [(f"FD ({result['extractor']})", result["fd"], result["fd_floor"]),
            (f"precision (k={result['k']})", result["precision"], None),
            (f"recall (k={result['k']})", result["recall"], None)]
    if "cond_acc" in result:
        rows.append(("class accuracy", result["cond_acc"], result.get("cond_acc_real")))
    _print_table(f"{result['n']} samples from {source} vs {result['reference']} ({result['n_reference']} images); "
                 f"real data: FD of {result['n_floor']} real training images (the floor), class accuracy of the "
                 "reference's test images", rows, result, args.json)


def cmd_eval_autoencoder(args) -> None:
    from latentdiff.pipeline.model import resolve_device

    if args.extractor != "inception" and args.inception_weights:
        raise ConfigError("--inception-weights only applies with --extractor inception")
    result = evaluate_autoencoder(args.model, n=args.n, reference=args.reference, extractor=args.extractor,
                                  weights=args.inception_weights, device=resolve_device(args.device),
                                  batch_size=args.batch_size, data_dir=args.data_dir)
    result["model"] = str(args.model)
    rows = [("PSNR (dB)", result["psnr"], None), ("SSIM", result["ssim"], None),
            (f"recon FD, paired ({result['extractor']})", result["fd"], None),
            (f"recon FD vs train ({result['extractor']})", result["fd_unpaired"], result["fd_floor"])]
    _print_table(f"autoencoder {args.model}: {result['n']} reconstructions of {result['reference']}; paired: vs "
                 f"their originals (0 = perfect); vs train: vs {result['n_floor']} real training images, real "
                 "data: the originals vs the same (the floor)", rows, result, args.json)


def _add_scoring_options(p) -> None:
    from latentdiff.cli.main import _positive_int

    g = p.add_argument_group("scoring")
    g.add_argument("--extractor", choices=EXTRACTOR_NAMES, default=DEFAULT_EXTRACTOR,
                   help="feature network for FD and precision/recall (default: fashion-mnist-classifier, the "
                        "shipped 28×28 grayscale classifier; `inception` is the FID network and needs "
                        "--inception-weights)")
    g.add_argument("--inception-weights", metavar="PATH",
                   help="Inception-v3 weights for --extractor inception: pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth or the same tensors as .safetensors (never downloaded)")
    g.add_argument("--reference", choices=REFERENCES, default="fashion-mnist",
                   help="real data whose test split is the reference and whose train split gives the floor: "
                        "fashion-mnist (full IDX files, 10k test images; default) or bundled (2k test images)")
    g.add_argument("--data-dir", metavar="DIR", help="folder holding the Fashion-MNIST IDX files")
    g.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default: 256)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    g.add_argument("--json", action="store_true", help="also print all results as one JSON object on the last line")


def register(subparsers) -> None:
    """Add the `eval` and `eval-autoencoder` subcommands to the `latentdiff` parser."""
    from latentdiff.cli.main import SAMPLER_NAMES, SPACING_NAMES, _count, _nonneg_float, _positive_int, _seed

    p = subparsers.add_parser(
        "eval", help="score a model or a samples file: FD next to its real-vs-real floor, precision/recall",
        description="Score generated images against the test split of the reference data: Fréchet distance (FD) "
                    "in the feature space of --extractor, printed next to the real-vs-real floor (the FD of as "
                    "many real training images), k-NN precision and recall, and for class-conditional samples "
                    "the accuracy of the Fashion-MNIST classifier on them. Give --model to generate the images "
                    "(conditional models: every class in turn) or --samples to score an existing .npz.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="DIR", help="a model directory or pretrained:NAME to sample from")
    what.add_argument("--samples", metavar="FILE.npz",
                      help="an .npz with `images` (uint8 N×H×W or N×H×W×C) and optional `labels` (N class "
                           "indices), e.g. from `latentdiff sample --out FILE.npz`")
    p.add_argument("--n", type=_count,
                   help="number of images: to generate with --model (default: 10000), or the first N of --samples "
                        "(default: all)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, metavar="NAME",
                   help="with --model: one of %(choices)s (default: the model's)")
    p.add_argument("--steps", type=_positive_int, help="with --model: sampling steps (default: the model's)")
    p.add_argument("--spacing", choices=SPACING_NAMES, metavar="NAME",
                   help="with --model: timestep grid, one of %(choices)s (default: trailing)")
    p.add_argument("--guidance", type=_nonneg_float, help="with --model: classifier-free guidance scale (1 = none; "
                   "default: the model's)")
    p.add_argument("--seed", type=_seed, default=0, help="with --model: sampling seed (default: 0)")
    p.add_argument("--k", type=_positive_int, default=3, help="neighbourhood size k of precision/recall (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while sampling")
    _add_scoring_options(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "eval-autoencoder", help="score an autoencoder's reconstructions: PSNR, SSIM, paired and unpaired recon FD",
        description="Reconstruct the first N images of the reference test split through the model's autoencoder "
                    "(posterior mean) and report mean PSNR, mean SSIM, the paired FD between reconstructions and "
                    "their originals (0 for a perfect codec), and the unpaired FD between reconstructions and N "
                    "real training images next to its floor (the originals vs the same training images).")
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory or pretrained:NAME")
    p.add_argument("--n", type=_count, default=2000, help="held-out images to reconstruct (default: 2000)")
    _add_scoring_options(p)
    p.set_defaults(func=cmd_eval_autoencoder)
