"""Join the results of several ``bench/run.py`` commands run one after another on the same machine.

    python bench/merge.py OUT_LATENTDIFF OUT_DIFFUSERS OUT_DDPM OUT_NFE --out OUT

A device session may limit one command's time (10 minutes on the lent GPUs), while four systems with
four-minute budgets need more; each command then runs some of the systems (``--systems``) or parts
(``--parts``) with the same settings, and this joins them: side-by-side rows, quality-vs-time points, the
NFE sweep, the speed part and the demo timing, with the latentdiff/peer ratios and the targets recomputed. It refuses results from different machines or different settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import report

SAME = ("data", "budget_seconds", "n_eval", "extractor", "reference", "batch_size", "sample_steps", "size")


def merge(results: list[dict]) -> dict:
    devices = {r["machine"]["device"] for r in results}
    if len(devices) > 1:
        raise ValueError(f"results come from different machines: {', '.join(sorted(devices))}")
    out = {"command": " ; ".join(r["command"] for r in results), "machine": results[0]["machine"],
           "seconds": sum(r.get("seconds") or 0 for r in results)}
    sbs = [r["side_by_side"] for r in results if r.get("side_by_side")]
    if sbs:
        for key in SAME:
            values = {json.dumps(s[key]) for s in sbs}
            if len(values) > 1:
                raise ValueError(f"side-by-side results differ in {key}: {', '.join(sorted(values))}")
        systems = [row for s in sbs for row in s["systems"]]
        names = [row["name"] for row in systems]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"system(s) {', '.join(dupes)} appear in more than one result")
        out["side_by_side"] = {**{k: sbs[0][k] for k in SAME}, "systems": systems,
                               "ratios": report.ratios(systems), "notes": [n for s in sbs for n in s["notes"]]}
        curves = [r["quality_vs_time"] for r in results if r.get("quality_vs_time")]
        if len({c["n"] for c in curves}) > 1:
            raise ValueError("quality-vs-time results were scored on different numbers of samples")
        out["quality_vs_time"] = {"n": curves[0]["n"], "points": [p for c in curves for p in c["points"]]}
    for key, what in (("nfe", "an NFE sweep"), ("speed", "a speed part"), ("demo", "a demo timing")):
        parts = [r[key] for r in results if r.get(key)]
        if len(parts) > 1:
            raise ValueError(f"more than one result holds {what}")
        if parts:
            out[key] = parts[0]
    out["targets"] = report.targets(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/merge.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="output directories of bench/run.py (each with results.json)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    results = []
    for d in args.dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            p.error(f"{path} not found")
        results.append(json.loads(path.read_text()))
    try:
        res = merge(results)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = report.plots(res, out)
    (out / "results.md").write_text(report.markdown(res))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {', '.join(res['plots'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
