"""Class accuracy and sample quality per guidance setting: classifier-free and classifier guidance.

    python bench/guidance.py --model pretrained:fashion-mnist --n 1000 --json guidance.json --md guidance.md
    python bench/guidance.py --n 100 --reference bundled          # a CPU smoke run (accuracy only below 129)

For every setting the same seed, sampler, steps and labels (every class in turn) are used, so rows
differ only in guidance. Class accuracy is the shipped Fashion-MNIST evaluation classifier's
(``features.py``) against the requested labels; FD (next to its real-vs-real floor), precision and
recall come from ``evaluate.evaluate_samples`` in that classifier's feature space. FD needs more
images than feature dimensions (129 for the 128-d classifier): with a smaller --n only accuracy is
reported. Prints one JSON object; --json and --md write it and a markdown table to files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from latentdiff.errors import LatentDiffError
from latentdiff.evaluation.evaluate import DEFAULT_EXTRACTOR, REFERENCES, _extractor, evaluate_samples
from latentdiff.evaluation.features import EXTRACTORS
from latentdiff.evaluation.metrics import classification_accuracy
from latentdiff.pipeline import LatentDiffusion, resolve_device
from latentdiff.utils.files import write_text_atomic


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be finite numbers >= 0, got {text}")
    return values


def settings(cfg_scales, classifier_scales, classifier_cfg) -> list[tuple[float, float]]:
    """(CFG scale, classifier scale) pairs: each CFG scale alone, then each classifier scale at `classifier_cfg`."""
    return [(w, 0.0) for w in cfg_scales] + [(classifier_cfg, s) for s in classifier_scales if s > 0]


def run(args) -> dict:
    device = resolve_device(args.device)
    pipe = LatentDiffusion.load(args.model, device)
    if not pipe.num_classes:
        raise LatentDiffError(f"{args.model} is unconditional: this benchmark compares class-conditional guidance")
    if args.classifier_scales:
        pipe.load_classifier(args.classifier)
    labels = [i % pipe.num_classes for i in range(args.n)]  # every class in turn
    full = args.n > EXTRACTORS[DEFAULT_EXTRACTOR].dim
    sampler, steps = args.sampler or pipe.cfg.sample.sampler, args.steps or pipe.cfg.sample.steps
    rows = []
    for w, s in settings(args.cfg_scales, args.classifier_scales, args.classifier_cfg):
        t0 = time.perf_counter()
        images, used = pipe.generate(args.n, sampler=sampler, steps=steps, seed=args.seed, labels=labels,
                                     guidance=w, classifier_scale=s, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        if full:
            scores = evaluate_samples(images, used, reference=args.reference, data_dir=args.data_dir,
                                      device=device, batch_size=args.batch_size, seed=args.seed)
            row = {k: scores[k] for k in ("cond_acc", "fd", "fd_floor", "precision", "recall")}
        else:
            clf = _extractor(DEFAULT_EXTRACTOR, None, device)
            row = {"cond_acc": classification_accuracy(clf.predict(images, batch_size=args.batch_size), used)}
        row = {"cfg_scale": w, "classifier_scale": s, **row, "sample_seconds": round(seconds, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"model": str(args.model), "n": args.n, "sampler": sampler, "steps": steps, "seed": args.seed,
            "reference": f"{args.reference} (test)" if full else None, "extractor": DEFAULT_EXTRACTOR,
            "default_cfg_scale": pipe.cfg.sample.guidance, "device": str(device),
            "note": "sample_seconds are wall-clock on the machine named by device and not comparable across machines",
            "settings": rows}


def markdown(result: dict) -> str:
    def f(v, spec=".3f"):
        return "–" if v is None else format(v, spec)

    lines = [(f"Guidance on `{result['model']}`: {result['n']} samples per row (classes in turn), "
             f"{result['sampler']} with {result['steps']} steps, seed {result['seed']}. Class accuracy: the "
             f"Fashion-MNIST evaluation classifier against the requested class; FD/precision/recall in its "
             f"feature space vs {result['reference'] or '(not computed: n too small)'}."), "",
             "| CFG scale | classifier scale | class accuracy | FD | FD floor | precision | recall |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["settings"]:
        default = " (default)" if r["cfg_scale"] == result["default_cfg_scale"] and r["classifier_scale"] == 0 else ""
        lines.append(f"| {r['cfg_scale']:g}{default} | {r['classifier_scale']:g} | {f(r['cond_acc'])} | "
                     f"{f(r.get('fd'), '.2f')} | {f(r.get('fd_floor'), '.2f')} | {f(r.get('precision'))} | "
                     f"{f(r.get('recall'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained:fashion-mnist", help="model directory or pretrained:NAME")
    p.add_argument("--n", type=int, default=1000, help="samples per setting (default: 1000)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the model's")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scales", type=_scales, default=[0.0, 1.0, 1.5, 2.0, 3.0, 5.0],
                   help="classifier-free guidance scales (default: 0,1,1.5,2,3,5)")
    p.add_argument("--classifier-scales", type=_scales, default=[0.5, 1.0, 2.0, 4.0],
                   help="classifier guidance scales; empty for none (default: 0.5,1,2,4)")
    p.add_argument("--classifier-cfg", type=float, default=1.0,
                   help="CFG scale used with classifier guidance (1: the conditional model; default: 1)")
    p.add_argument("--classifier", help="classifier file (default: MODEL_DIR/classifier.safetensors)")
    p.add_argument("--reference", choices=REFERENCES, default="fashion-mnist", help="default: fashion-mnist")
    p.add_argument("--data-dir", help="folder holding the Fashion-MNIST IDX files")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_path", help="also write the JSON here")
    p.add_argument("--md", dest="md_path", help="write a markdown table here")
    args = p.parse_args(argv)
    if args.n < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        p.error("--n, --steps and --batch-size must be positive")
    if not args.cfg_scales and not args.classifier_scales:
        p.error("nothing to run: give --cfg-scales and/or --classifier-scales")
    try:
        result = run(args)
    except LatentDiffError as e:
        print(f"bench/guidance.py: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        write_text_atomic(args.json_path, text + "\n")
    if args.md_path:
        write_text_atomic(args.md_path, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
