"""One benchmark command: latentdiff side by side with its peers, quality vs NFE, quality vs time, speed, and
the issue-5 targets table built from them.

    python bench/run.py --preset gpu --out bench-gpu      # the GPU run (H100/H200): every part, 10k samples
    python bench/run.py --preset cpu --out bench-cpu      # the CPU run in docs/benchmarks.md (about an hour)
    python bench/run.py --device cpu --budget-seconds 60 --n-eval 500 --nfe 5 10 20 --out bench-out

A preset sets every option below to the values its run used; options given on the command line win.
Parts (``--parts``, all by default):
  side-by-side  latentdiff (full budget and ``--ld-fraction`` of it, autoencoder training included) and
                the peers (diffusers, denoising-diffusion-pytorch), trained on the same resident tensors
                for the same wall-clock budget, sampled, and scored with latentdiff's evaluation; EMA
                snapshots during training give quality vs training wall-clock
  nfe           every sampler in latentdiff.samplers.SAMPLERS at every ``--nfe`` on ``--nfe-model``
  speed         training images/s (eager, compiled, fp32/bf16), FLOPs per step and MFU, and sampled
                images/s at each ``--speed-nfe`` (eager, compiled, CUDA graphs, fp32/bf16), on ``--speed-model``
                through latentdiff's own training loop and pipeline (bench/speed.py)
  demo          ``latentdiff demo`` end to end in a subprocess, timed
Writes OUT/results.json, OUT/results.md and PNG plots into OUT. Missing peers are skipped with a note.
``--systems`` runs a subset; bench/merge.py joins several such outputs from one machine into one report.
See docs/benchmarks.md ("What the harness measures", "Caveats") for the columns and caveats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from common import PeakMemory, machine, matmul_peak, sync

from latentdiff.data import find_fashion_mnist, load_dataset
from latentdiff.errors import ConfigError, LatentDiffError
from latentdiff.evaluation.evaluate import evaluate_samples
from latentdiff.evaluation.features import EXTRACTORS
from latentdiff.pipeline import resolve_device
from latentdiff.utils.images import to_tensor

PARTS = ("side-by-side", "nfe", "speed", "demo")
SYSTEMS = ("latentdiff", "latentdiff-fraction", "diffusers", "ddpm")
MIN_N = EXTRACTORS["fashion-mnist-classifier"].dim + 1  # full-rank covariance of the 128-d features
ROOT = Path(__file__).resolve().parents[1]

# The settings of the runs in docs/benchmarks.md. "cpu": 2 cores, about an hour, at budgets where no system
# converges; "gpu": the issue-5 settings (peers 4 minutes, latentdiff a quarter of that, 10k samples).
PRESETS = {
    "cpu": {"device": "cpu", "parts": list(PARTS), "size": "small", "data": "auto", "limit": 10_000,
            "budget_seconds": 180, "ld_fraction": 0.25, "n_eval": 300, "snapshots": 2, "n_snapshot": 150,
            "nfe": [5, 10, 20], "nfe_spacing": ["trailing", "karras"], "n_nfe": 200,
            "speed_nfe": [10, 20, 50], "speed_n": 512, "speed_batch": [256], "speed_train_steps": 40,
            "speed_log_every": 10, "speed_limit": 10_000},
    "gpu": {"device": "cuda", "parts": list(PARTS), "size": "full", "data": "auto", "limit": None,
            "budget_seconds": 240, "ld_fraction": 0.25, "n_eval": 10_000, "snapshots": 4, "n_snapshot": 2000,
            "nfe": [5, 10, 20, 50, 100], "nfe_spacing": ["trailing", "karras"], "n_nfe": 5000,
            "speed_nfe": [10, 20, 50], "speed_n": 16_384, "speed_batch": [256, 2048, 8192],
            "speed_train_steps": 1500, "speed_log_every": 100, "speed_limit": None},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (results.json, results.md, *.png)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the settings of a documented run (options given here override it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("side by side")
    g.add_argument("--budget-seconds", type=float, default=240.0, help="the peers' training wall-clock budget")
    g.add_argument("--ld-fraction", type=float, default=0.25,
                   help="latentdiff also runs with this fraction of the budget (issue 5: a quarter)")
    g.add_argument("--ae-fraction", type=float, default=0.3, help="part of latentdiff's budget for the autoencoder")
    g.add_argument("--n-eval", type=int, default=10_000, help="samples scored per system")
    g.add_argument("--snapshots", type=int, default=4, help="EMA snapshots per system for quality vs time (0: none)")
    g.add_argument("--n-snapshot", type=int, default=None, help="samples per snapshot (default: --n-eval, max 2000)")
    g.add_argument("--sample-steps", type=int, default=50, help="sampling steps (DDIM) for every system")
    g.add_argument("--batch-size", type=int, default=128, help="training batch size for every system")
    g.add_argument("--size", choices=("full", "small", "tiny"), default="full",
                   help="model sizes: full (the shipped preset; the peers' defaults scaled to 28×28), small (CPU: "
                        "the demo preset; peers at a quarter/half width) or tiny (smoke tests)")
    g.add_argument("--data", choices=("auto", "fashion-mnist", "bundled"), default="auto",
                   help="training data; auto: the full Fashion-MNIST when found, else the bundled 10k subset")
    g.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    g.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help="which systems to run (latentdiff-fraction: latentdiff with --ld-fraction of the budget); "
                        "split a long run over several commands and join them with bench/merge.py")
    g.add_argument("--conditional", action="store_true",
                   help="train latentdiff class-conditional and sample with its preset's guidance "
                        "(default: unconditional, like the peers)")
    g = p.add_argument_group("quality vs NFE")
    g.add_argument("--nfe-model", default="pretrained:fashion-mnist")
    g.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100, 1000])
    g.add_argument("--n-nfe", type=int, default=None, help="samples per sampler/NFE (default: --n-eval)")
    g.add_argument("--reference-nfe", type=int, default=1000, help="NFE of the DDPM reference FD")
    g.add_argument("--nfe-spacing", nargs="+", default=["trailing"], choices=("trailing", "leading", "uniform", "karras"),
                   help="timestep grids to sweep (rows are labelled sampler/grid when more than one)")
    g = p.add_argument_group("speed")
    g.add_argument("--speed-model", default=None, help="model whose networks are timed (default: --nfe-model)")
    g.add_argument("--speed-sampler", default="dpmpp-2m", help="sampler for the images/s rows")
    g.add_argument("--speed-nfe", type=int, nargs="+", default=[10, 20, 50])
    g.add_argument("--speed-n", type=int, default=2048, help="images per sampling measurement")
    g.add_argument("--speed-batch", type=int, nargs="+", default=[256], help="sampling batch sizes")
    g.add_argument("--speed-train-steps", type=int, default=300, help="training steps per training variant")
    g.add_argument("--speed-log-every", type=int, default=50,
                   help="steps per logged interval (images/s is the median interval after the first)")
    g.add_argument("--speed-limit", type=int, default=None, help="encode only the first N training images")
    g.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    args.n_snapshot = args.n_snapshot or min(args.n_eval, 2000)
    args.n_nfe = args.n_nfe or args.n_eval
    for name in ("n_eval", "n_snapshot", "n_nfe"):
        if getattr(args, name) < MIN_N:
            p.error(f"--{name.replace('_', '-')} must be at least {MIN_N} (a full-rank covariance of the "
                    f"{MIN_N - 1}-d classifier features)")
    if not args.budget_seconds > 0 or not 0 < args.ld_fraction <= 1 or not 0 < args.ae_fraction < 1:
        p.error("need --budget-seconds > 0, 0 < --ld-fraction <= 1 and 0 < --ae-fraction < 1")
    if min(args.nfe) < 1 or args.sample_steps < 1 or args.batch_size < 1 or args.snapshots < 0:
        p.error("--nfe, --sample-steps and --batch-size must be >= 1, --snapshots >= 0")
    if min(args.speed_nfe + args.speed_batch + [args.speed_n, args.speed_train_steps, args.speed_log_every]) < 1:
        p.error("--speed-nfe, --speed-n, --speed-batch, --speed-train-steps and --speed-log-every must be >= 1")
    if args.speed_train_steps < 2 * args.speed_log_every:
        p.error("--speed-train-steps must be at least twice --speed-log-every (the first interval is warm-up)")
    args.speed_model = args.speed_model or args.nfe_model
    return args


def pick_data(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        find_fashion_mnist()
        return "fashion-mnist"
    except LatentDiffError:
        return "bundled"


def side_by_side(args, device: torch.device, peak_flops: float | None) -> tuple[dict, dict]:
    import report
    from ld_system import LatentDiffusionRun, ld_config
    from peers import RUNS, available

    source = pick_data(args.data)
    data = load_dataset(source, "train", limit=args.limit)
    x = to_tensor(data.images).to(device)
    log(f"data: {data.source}, {len(data)} images; peers' budget {args.budget_seconds:g} s")

    def score(images, labels=None):
        return evaluate_samples(images, labels, reference=source, device=device)

    systems, notes = [], []
    fractions = [1.0] * ("latentdiff" in args.systems) + [args.ld_fraction] * ("latentdiff-fraction" in args.systems)
    for frac in fractions:
        name = "latentdiff" if frac == 1 else f"latentdiff@{frac:g}"
        systems.append((lambda name=name: LatentDiffusionRun(
            name, ld_config(args.size, args.conditional, args.batch_size), data, device, ae_fraction=args.ae_fraction,
            sampler="ddim", sample_steps=args.sample_steps, seed=args.seed, log=log), frac))
    for peer in (name for name in args.systems if name in RUNS):
        why = available(peer)
        if why:
            notes.append(f"{peer} skipped: {why}")
            log(notes[-1])
            continue
        systems.append((lambda peer=peer: RUNS[peer](x, device, size=args.size, batch=args.batch_size,
                                                     sample_steps=args.sample_steps, seed=args.seed), 1.0))

    results, points = [], []
    for make, frac in systems:  # built one at a time, so that a system's peak memory holds only itself
        system = make()
        budget = args.budget_seconds * frac
        snap_at = [budget * (k + 1) / (args.snapshots + 1) for k in range(args.snapshots)]
        log(f"{system.name}: training for {budget:.1f} s")
        with PeakMemory(device) as train_mem:
            stats = system.train(budget, snap_at)
        system.sample(min(8, args.n_eval), seed=args.seed + 1)  # warm-up (kernels, caches), not timed
        with PeakMemory(device) as sample_mem:
            sync(device)
            t0 = time.perf_counter()
            images, labels = system.sample(args.n_eval, seed=args.seed)
            sync(device)
            sample_seconds = time.perf_counter() - t0
        metrics = score(images, labels)
        achieved = stats["flops_per_step"] * stats["train_images_per_s"] / args.batch_size
        row = {"name": system.name, "budget_seconds": budget, "describe": system.describe(), **stats,
               "achieved_flops": achieved, "mfu": achieved / peak_flops if peak_flops else None,
               "sample_seconds": sample_seconds, "sample_images_per_s": args.n_eval / sample_seconds,
               "train_peak_bytes": train_mem.bytes, "sample_peak_bytes": sample_mem.bytes, **metrics}
        results.append(row)
        log(f"{system.name}: {row['train_images_per_s']:.1f} train img/s, {row['sample_images_per_s']:.1f} "
            f"sample img/s, FD {metrics['fd']:.3f} (floor {metrics['fd_floor']:.3f})")
        for seconds, state in system.snapshots[:-1]:  # the last snapshot is the final model, scored above
            snap_images, snap_labels = system.sample(args.n_snapshot, seed=args.seed, state=state)
            m = score(snap_images, snap_labels)
            points.append({"system": system.name, "seconds": seconds, **{k: m[k] for k in ("fd", "precision",
                                                                                             "recall")}})
        points.append({"system": system.name, "seconds": stats["seconds"],
                       **{k: metrics[k] for k in ("fd", "precision", "recall")}})
        system = None  # free its weights, optimizer state and snapshots before the next system
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not results:
        raise ConfigError("no system ran: " + "; ".join(notes))
    first = results[0]
    sbs = {"data": data.source, "budget_seconds": args.budget_seconds, "n_eval": args.n_eval,
           "extractor": first["extractor"], "reference": first["reference"], "batch_size": args.batch_size,
           "sample_steps": args.sample_steps, "size": args.size, "systems": results, "ratios": report.ratios(results), "notes": notes}
    curve = {"n": args.n_snapshot, "points": points}
    return sbs, curve


def nfe_part(args, device: torch.device) -> dict:
    from nfe import nfe_sweep

    model = args.nfe_model
    source = pick_data(args.data)
    log(f"quality vs NFE on {model}: NFE {args.nfe}, {args.n_nfe} samples each, reference {source} (test)")

    def score(images, labels):
        return evaluate_samples(images, labels, reference=source, device=device)

    return nfe_sweep(model, device, args.nfe, args.n_nfe, score, reference_nfe=args.reference_nfe, seed=args.seed,
                     spacings=tuple(args.nfe_spacing), log=log)


def speed_part(args, device: torch.device, peak_flops: float | None) -> dict:
    import speed

    log(f"speed on {args.speed_model}: training ({args.speed_train_steps} steps per variant), sampling "
        f"({args.speed_sampler}, NFE {args.speed_nfe}, {args.speed_n} images, batch {args.speed_batch})")
    train = speed.train_speed(args.speed_model, device, pick_data(args.data), steps=args.speed_train_steps,
                              log_every=args.speed_log_every, limit=args.speed_limit,
                              variants=speed.train_variants(device, not args.no_compile), peak_flops=peak_flops,
                              log=log)
    sample = speed.sample_speed(args.speed_model, device, nfes=args.speed_nfe, n=args.speed_n,
                                batch_sizes=args.speed_batch, sampler=args.speed_sampler,
                                variants=speed.sample_variants(device, not args.no_compile), log=log)
    return {"train": train, "sample": sample}


def demo_part(device: torch.device) -> dict:
    """``latentdiff demo`` in a fresh process (imports and data loading included), timed by the wall clock."""
    import os
    import subprocess
    import tempfile

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="ld-demo-") as tmp:
        cmd = [sys.executable, "-m", "latentdiff", "demo", "--out", str(Path(tmp) / "demo.png"),
               "--run-dir", str(Path(tmp) / "run"), "--device", device.type, "--no-progress"]
        log(f"demo: latentdiff demo --device {device.type}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise LatentDiffError(f"latentdiff demo failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    log(f"demo: {seconds:.0f} s")
    return {"seconds": seconds, "threads": torch.get_num_threads(), "device": device.type}


def _finite(obj):
    """JSON has no NaN/inf: write them as null (and say so in the markdown by the '–' it shows)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_results(res: dict, out: Path) -> dict:
    """Targets, plots, results.json and results.md from what has been measured so far."""
    import report

    res = _finite({**res, "targets": report.targets(res)})
    try:
        res["plots"] = report.plots(res, out)
    except ImportError:
        res["plots"] = []
        log("matplotlib is not installed: no plots (pip install -e '.[bench]')")
    (out / "results.md").write_text(report.markdown(res))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        peak, peak_dtype = matmul_peak(device)
        res = {"command": "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
               "machine": {"device": machine(device), "device_type": device.type, "torch": torch.__version__,
                           "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "matmul_peak_flops": peak, "matmul_peak_dtype": peak_dtype,
                           "peak_memory": PeakMemory(device).kind}}
        t0 = time.perf_counter()
        for part in PARTS:  # results are rewritten after every part: a run cut short keeps what it measured
            if part not in args.parts:
                continue
            if part == "side-by-side":
                res["side_by_side"], res["quality_vs_time"] = side_by_side(args, device, peak)
            elif part == "nfe":
                res["nfe"] = nfe_part(args, device)
            elif part == "speed":
                res["speed"] = speed_part(args, device, peak)
            else:
                res["demo"] = demo_part(device)
            res["seconds"] = time.perf_counter() - t0
            res = write_results(res, out)
    except LatentDiffError as e:
        print(f"bench/run.py: error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {', '.join(res['plots'])} "
        f"in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
