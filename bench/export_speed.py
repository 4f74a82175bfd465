"""Sampling speed of one model under three runtimes, side by side in one run: PyTorch eager, PyTorch compiled
(``generate(..., compile=True)``) and ONNX Runtime (``latentdiff.export.load_onnx``).

Each runtime runs in its own fresh process (so peak memory and time to first image are its own): time to first
image = load (for ONNX: open the exported graphs; for compiled: also the compilation, which happens in the first
batch) plus the first batch of `--n` images at the lowest NFE; then images/s for a batch of `--n` images at each
NFE, the median of `--repeats` runs. NFE counts sampler steps: with classifier-free guidance each step is one
network call on the doubled batch. Peak memory is the process's peak resident set (ru_maxrss).

    python bench/export_speed.py [--model pretrained:fashion-mnist] [--threads 2] [--out results.json]

Needs the `onnx` extra. The ONNX export is written once to a temporary folder (its time is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIMES = ("eager", "compiled", "onnx")


def worker(args) -> dict:
    import torch

    from latentdiff.export import load_onnx
    from latentdiff.pipeline.model import LatentDiffusion

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_onnx(args.onnx_dir, threads=args.threads) if args.runtime == "onnx" else LatentDiffusion.load(args.model)
    compile_ = args.runtime == "compiled"
    labels = [i % max(pipe.num_classes, 1) for i in range(args.n)] if pipe.num_classes else None

    def run(nfe):
        t0 = time.perf_counter()
        pipe.generate(args.n, steps=nfe, seed=0, labels=labels, batch_size=args.n, compile=compile_)
        return time.perf_counter() - t0

    run(args.nfe[0])
    first = time.perf_counter() - start
    speed = {str(nfe): round(args.n / statistics.median(run(nfe) for _ in range(args.repeats)), 1) for nfe in args.nfe}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"runtime": args.runtime, "first_image_s": round(first, 2), "images_per_s": speed,
            "seconds_at_lowest_nfe": round(args.n / speed[str(args.nfe[0])], 2), "peak_rss_mb": round(peak_mb)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pretrained:fashion-mnist")
    p.add_argument("--n", type=int, default=64, help="images per batch")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="keep the ONNX export here and reuse it when it exists (default: a temporary folder)")
    p.add_argument("--runtime", choices=RUNTIMES, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runtime:
        print(json.dumps(worker(args)))
        return
    import torch

    from latentdiff.export import export_onnx
    from latentdiff.pipeline.model import LatentDiffusion

    torch.set_num_threads(args.threads)
    results = {"model": args.model, "n": args.n, "nfe": args.nfe, "threads": args.threads,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                          f"{args.threads} threads", "load_average": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = str(args.export_dir or tmp)
        if not (Path(onnx_dir) / "config.json").is_file():
            t0 = time.perf_counter()
            summary = export_onnx(LatentDiffusion.load(args.model), onnx_dir)
            results["export_s"] = round(time.perf_counter() - t0, 1)
            results["parity"] = summary["max_abs_error"]
            print(json.dumps({"export_s": results["export_s"], "parity": results["parity"]}), flush=True)
        for runtime in args.runtimes:
            cmd = [sys.executable, __file__, "--runtime", runtime, "--onnx-dir", onnx_dir, "--model", args.model,
                   "--n", str(args.n), "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--nfe", *map(str, args.nfe)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results["runs"].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results["runs"][-1]), flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def table(results: dict) -> str:
    nfe = results["nfe"]
    head = ["runtime", *[f"images/s @ {k} NFE" for k in nfe], "time to first image (s)", "peak RSS (MB)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        rows.append("| " + " | ".join([r["runtime"], *[str(r["images_per_s"][str(k)]) for k in nfe],
                                       str(r["first_image_s"]), str(r["peak_rss_mb"])]) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
