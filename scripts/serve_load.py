"""Load benchmark of `latentdiff serve` on loopback: C clients share J small generate jobs, with batching on
and off; prints p50/p95 latency (submit -> done) and images/s, and checks that every job finished or got 429.

    python scripts/serve_load.py [--model pretrained:fashion-mnist] [--clients 20] [--jobs 200] [--steps 10]

Results are in docs/benchmarks.md ("Serving under load").
"""

import argparse
import json
import tempfile
from pathlib import Path

from latentdiff.serve.load import run_load, running_server


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pretrained:fashion-mnist")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-queue", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for batching in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["--max-queue", str(args.max_queue)] + ([] if batching else ["--no-batching"])
            with running_server(args.model, Path(tmp) / "out", *extra) as (url, _):
                result = run_load(url, args.clients, args.jobs,
                                  lambda i: {"n": 1, "steps": args.steps, "seed": i, "class": i % 10},
                                  timeout=1200)
        s = result.summary()
        lost = len(set(result.accepted)) != len(result.accepted) or set(result.finished) != set(result.accepted)
        rows.append({"batching": batching, **s, "lost_or_duplicate": lost})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batching | jobs done | 429 | p50 latency | p95 latency | images/s | lost or duplicate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {'on' if r['batching'] else 'off'} | {r['done']} | {r['rejected_429']} | {r['p50_s']:.2f} s | "
              f"{r['p95_s']:.2f} s | {r['images_per_s']:.1f} | {'YES' if r['lost_or_duplicate'] else 'none'} |")


if __name__ == "__main__":
    main()
