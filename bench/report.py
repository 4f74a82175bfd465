"""Markdown tables and PNG plots from the harness's result dict (the JSON it writes)."""

from __future__ import annotations

from pathlib import Path


def _f(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _mib(b):
    return None if b is None else b / 2**20


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def ratios(systems: list[dict]) -> list[dict]:
    """latentdiff / peer for training throughput, sampling throughput and FD, every latentdiff variant × peer."""
    out = []
    for ld in (s for s in systems if s["name"].startswith("latentdiff")):
        for peer in (s for s in systems if not s["name"].startswith("latentdiff")):
            out.append({"latentdiff": ld["name"], "peer": peer["name"],
                        "train_throughput": ld["train_images_per_s"] / peer["train_images_per_s"],
                        "sample_throughput": ld["sample_images_per_s"] / peer["sample_images_per_s"],
                        "fd": ld["fd"] / peer["fd"]})
    return out


def _peers(sbs: dict | None):
    systems = sbs["systems"] if sbs else []
    ld = next((s for s in systems if s["name"] == "latentdiff"), None)
    frac = next((s for s in systems if s["name"].startswith("latentdiff@")), None)
    return ld, frac, [s for s in systems if not s["name"].startswith("latentdiff")]


def _nfe_target(sweep: dict, nfe: int, limit: float) -> dict | None:
    rows = [r for r in sweep["rows"] if r["nfe"] == nfe]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["fd_over_reference"])
    met = [r for r in rows if r["fd_over_reference"] <= limit]
    return {"target": f"few-step samplers: FD at {nfe} NFE ≤ {limit:g} × the {sweep['reference']['nfe']}-step DDPM FD",
            "measured": (f"best {best['sampler']} {best['fd_over_reference']:.2f}×; {len(met)} of {len(rows)} "
                         f"sampler/grid pairs within (reference FD {sweep['reference']['fd']:.3g}, "
                         f"{sweep['n']} samples each)"),
            "value": best["fd_over_reference"], "met": best["fd_over_reference"] <= limit}


def targets(res: dict) -> list[dict]:
    """The issue-5 targets with the measured value and whether each is met (None: no target, a figure to report).

    Peer targets compare latentdiff with the *faster* peer on each axis; the quality target compares the
    latentdiff run with a fraction of the budget against *both* peers."""
    out = []
    sweep = res.get("nfe")
    if sweep:
        out += [t for t in (_nfe_target(sweep, 10, 1.15), _nfe_target(sweep, 20, 1.05)) if t]
    ld, frac, peers = _peers(res.get("side_by_side"))
    n_eval = (res.get("side_by_side") or {}).get("n_eval")
    if ld and peers:
        fast_train = max(peers, key=lambda s: s["train_images_per_s"])
        ratio = ld["train_images_per_s"] / fast_train["train_images_per_s"]
        out.append({"target": "training throughput ≥ 3× the faster peer",
                    "measured": (f"{ratio:.1f}× {fast_train['name']} ({ld['train_images_per_s']:,.0f} vs "
                                 f"{fast_train['train_images_per_s']:,.1f} images/s)"), "value": ratio, "met": ratio >= 3})
        fast_sample = max(peers, key=lambda s: s["sample_images_per_s"])
        ratio = ld["sample_images_per_s"] / fast_sample["sample_images_per_s"]
        best_fd = min(s["fd"] for s in peers)
        out.append({"target": "sampling throughput at equal or better FD ≥ 10× the faster peer",
                    "measured": (f"{ratio:.1f}× {fast_sample['name']} ({ld['sample_images_per_s']:,.1f} vs "
                                 f"{fast_sample['sample_images_per_s']:,.2f} images/s) at FD {ld['fd']:.3g} vs the "
                                 f"peers' best {best_fd:.3g}"),
                    "value": ratio, "met": ratio >= 10 and ld["fd"] <= best_fd})
    if frac and peers:
        best_peer = min(s["fd"] for s in peers)
        out.append({"target": "better FD than both peers with a quarter of their wall-clock (autoencoder included)",
                    "measured": (f"{frac['name']}: FD {frac['fd']:.3g} in {frac['budget_seconds']:g} s vs "
                                 + ", ".join(f"{s['name']} {s['fd']:.3g}" for s in peers)
                                 + f" in {peers[0]['budget_seconds']:g} s ({n_eval} samples each)"),
                    "value": frac["fd"] / best_peer, "met": frac["fd"] < best_peer})
    demo = res.get("demo")
    if demo:
        on_cpu = demo["device"] == "cpu"
        out.append({"target": "`latentdiff demo` ≤ 3 min on 2 CPU cores" if on_cpu else "`latentdiff demo` end to end",
                    "measured": f"{demo['seconds']:.0f} s ({demo['threads']} torch threads, {demo['device']})",
                    "value": demo["seconds"], "met": demo["seconds"] <= 180 if on_cpu else None})
    speed = res.get("speed")
    if speed:
        train = speed["train"]
        best = max(train["rows"], key=lambda r: r["images_per_s"])
        m = res["machine"]
        out.append({"target": "training MFU (achieved ÷ measured matmul peak)",
                    "measured": (f"{best['mfu']:.1%} ({best['variant']}: {best['images_per_s']:,.0f} images/s × "
                                 f"{train['flops_per_step'] / train['batch_size'] / 1e6:.0f} MFLOP/image; peak "
                                 f"{m['matmul_peak_flops'] / 1e12:.3g} TFLOP/s {m['matmul_peak_dtype']})"
                                 if best.get("mfu") is not None else "no peak measured"),
                    "value": best.get("mfu"), "met": None})
        for r in train["rows"][1:]:
            out.append({"target": f"training speed-up of {r['variant']}",
                        "measured": (f"{r['speedup_vs_eager']:.2f}× {train['rows'][0]['variant']} "
                                     f"({r['images_per_s']:,.0f} vs {train['rows'][0]['images_per_s']:,.0f} images/s)"),
                        "value": r["speedup_vs_eager"], "met": None})
        for r in speed["sample"]["best"]:
            out.append({"target": f"sampling images/s at {r['nfe']} NFE ({speed['sample']['sampler']}, decoding included)",
                        "measured": (f"{r['images_per_s']:,.0f} images/s ({r['variant']}, batch {r['batch_size']}; "
                                     f"{r['speedup_vs_eager_fp32']:.2f}× {speed['sample']['rows'][0]['variant']})"),
                        "value": r["images_per_s"], "met": None})
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# latentdiff benchmark — {m['device']}", "",
             f"torch {m['torch']}, device `{m['device_type']}`, {m['when']}; command: `{res['command']}`", "",
             "Peak memory is " + ("`torch.cuda.max_memory_allocated`." if m["device_type"] == "cuda" else
                                  "the growth of the process's `ru_maxrss` during the phase (CPU; an upper bound, "
                                  "0 when the phase stayed below an earlier peak)."), ""]
    if res.get("targets"):
        lines += [f"## Issue 5 targets — {m['device']}", ""]
        lines += _table(["target", "measured", "met"],
                        [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "–"}[t["met"]]]
                         for t in res["targets"]])
    sbs = res.get("side_by_side")
    if sbs:
        lines += [f"## Side by side: same data ({sbs['data']}), same machine, same run", "",
                  (f"Peers' budget {sbs['budget_seconds']:g} s; latentdiff variants get the stated fraction of it "
                  f"*including* autoencoder training. Every system is scored with latentdiff's evaluation on "
                  f"{sbs['n_eval']} samples ({sbs['extractor']} features, reference {sbs['reference']})."), ""]
        header = ["system", "budget s", "params (M)", "steps", "train img/s", "GFLOP/step", "achieved TFLOP/s",
                  "MFU", "sample img/s", "train peak MiB", "sample peak MiB", "FD", "floor", "precision", "recall"]
        rows = []
        for s in sbs["systems"]:
            rows.append([s["name"], s["budget_seconds"], sum(s["params"].values()) / 1e6, s["steps"],
                         s["train_images_per_s"], s["flops_per_step"] / 1e9, s["achieved_flops"] / 1e12,
                         s.get("mfu"), s["sample_images_per_s"], _mib(s["train_peak_bytes"]),
                         _mib(s["sample_peak_bytes"]), s["fd"], s["fd_floor"], s["precision"], s["recall"]])
        lines += _table(header, rows)
        for s in sbs["systems"]:
            d = s["describe"]
            lines.append(f"- **{s['name']}**: " + "; ".join(f"{k}: {v}" for k, v in d.items()))
        for note in sbs.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append("")
        if sbs.get("ratios"):
            lines += ["### Ratios latentdiff / peer", "",
                      "Throughput ratios > 1 and FD ratios < 1 favour latentdiff.", ""]
            lines += _table(["latentdiff", "peer", "train img/s ratio", "sample img/s ratio", "FD ratio"],
                            [[r["latentdiff"], r["peer"], r["train_throughput"], r["sample_throughput"], r["fd"]]
                             for r in sbs["ratios"]])
        if m.get("matmul_peak_flops"):
            lines += [_mfu_note(m), ""]
    curve = res.get("quality_vs_time")
    if curve:
        lines += ["## Quality vs training wall-clock", "",
                  f"EMA snapshots scored on {curve['n']} samples each; seconds since the system's start.", ""]
        lines += _table(["system", "seconds", "FD", "precision", "recall"],
                        [[p["system"], p["seconds"], p["fd"], p["precision"], p["recall"]] for p in curve["points"]])
    sweep = res.get("nfe")
    if sweep:
        ref = sweep["reference"]
        lines += [f"## Quality vs NFE: `{sweep['model']}`", "",
                  (f"{sweep['n']} samples per row, guidance {sweep['guidance']:g}. Reference: DDPM at {ref['nfe']} "
                  f"NFE, FD {ref['fd']:.3f}. NFE counted by a hook on the denoiser (a guided step is one batched "
                  "call)."), ""]
        lines += _table(["sampler", "NFE", "counted NFE", "steps", "FD", "FD / ref", "precision", "recall",
                         "seconds", "img/s", "peak MiB"],
                        [[r["sampler"], r["nfe"], r["nfe_counted"], r["steps"], r["fd"], r["fd_over_reference"],
                          r["precision"], r["recall"], r["seconds"], r["images_per_s"], _mib(r.get("peak_bytes"))]
                         for r in sweep["rows"]])
        if sweep["targets"]:
            lines += ["Issue 5 targets (FD within 15% of the reference at 10 NFE, 5% at 20 NFE):", ""]
            lines += _table(["sampler", "NFE", "FD / ref", "target", "met"],
                            [[t["sampler"], t["nfe"], t["fd_over_reference"], f"≤ {t['target']:g}",
                              "yes" if t["met"] else "no"] for t in sweep["targets"]])
        for s in sweep["skipped"]:
            lines.append(f"- skipped: {s}")
    speed = res.get("speed")
    if speed:
        train, sample = speed["train"], speed["sample"]
        lines += [f"## Speed: `{train['model']}`", "",
                  (f"Training: `latentdiff.train.train_diffusion` for {train['steps']} steps at batch "
                   f"{train['batch_size']} per variant ({train['params'] / 1e6:.2f} M parameters, "
                   f"{train['flops_per_step'] / 1e9:.3g} GFLOP per step, data {train['data']}); images/s is the median "
                   f"logged interval of {train['log_every']} steps after the first. {_mfu_note(m)}"), ""]
        lines += _table(["variant", "train img/s", "first interval img/s", "× eager", "TFLOP/s", "MFU", "wall s"],
                        [[r["variant"], r["images_per_s"], r["first_interval_images_per_s"], r["speedup_vs_eager"],
                          r["achieved_flops"] / 1e12, r["mfu"], r["wall_seconds"]] for r in train["rows"]])
        lines += [(f"Sampling: `generate` end to end with {sample['sampler']}, guidance {sample['guidance']:g}, "
                   "decoding to uint8 included, after a one-batch warm-up per variant."), ""]
        lines += _table(["variant", "batch", "NFE", "steps", "images", "seconds", "img/s", f"× {sample['rows'][0]['variant']}",
                         "warm-up s"],
                        [[r["variant"], r["batch_size"], r["nfe"], r["steps"], r["n"], r["seconds"], r["images_per_s"],
                          r["speedup_vs_eager_fp32"], r["warmup_seconds"]] for r in sample["rows"]])
    demo = res.get("demo")
    if demo:
        lines += ["## Demo", "", (f"`latentdiff demo` in a fresh process: {demo['seconds']:.0f} s wall "
                                  f"({demo['threads']} torch threads, device {demo['device']})."), ""]
    return "\n".join(lines).rstrip() + "\n"


def _mfu_note(m: dict) -> str:
    peak = m.get("matmul_peak_flops")
    if not peak:
        return "No matmul peak was measured: no MFU."
    return (f"MFU = achieved FLOP/s ÷ measured {m['matmul_peak_dtype']} matmul peak ({peak / 1e12:.3g} TFLOP/s on "
            f"this {'card' if m['device_type'] == 'cuda' else 'CPU'}).")


def plots(res: dict, out: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    device = res["machine"]["device"]
    sweep = res.get("nfe")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["sampler"] for r in sweep["rows"]):
            pts = sorted((r["nfe_counted"], r["fd"]) for r in sweep["rows"] if r["sampler"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(sweep["reference"]["fd"], color="gray", ls="--", lw=1,
                   label=f"DDPM {sweep['reference']['nfe']} NFE")
        ax.set(xscale="log", xlabel="NFE (counted)", ylabel="FD (classifier features)",
               title=f"Quality vs NFE, {sweep['model']}\n{device}")
        ticks = sorted({r["nfe_counted"] for r in sweep["rows"]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "fd_vs_nfe.png", dpi=120)
        plt.close(fig)
        written.append("fd_vs_nfe.png")
    curve = res.get("quality_vs_time")
    if curve and curve["points"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(p["system"] for p in curve["points"]):
            pts = sorted((p["seconds"], p["fd"]) for p in curve["points"] if p["system"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(yscale="log", xlabel="training wall-clock (s)", ylabel="FD (classifier features, log scale)",
               title=f"Quality vs training time\n{device}")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "fd_vs_seconds.png", dpi=120)
        plt.close(fig)
        written.append("fd_vs_seconds.png")
    sbs = res.get("side_by_side")
    if sbs and sbs["systems"]:
        names = [s["name"] for s in sbs["systems"]]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        for ax, key, label in zip(axes, ("train_images_per_s", "sample_images_per_s", "fd"),
                                  ("training images/s", "sampled images/s", "FD (lower is better)")):
            ax.bar(names, [s[key] for s in sbs["systems"]], color=["C0" if "latentdiff" in n else "C1" for n in names])
            ax.set_title(label)
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.suptitle(f"Side by side, peers' budget {sbs['budget_seconds']:g} s — {device}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "side_by_side.png", dpi=120)
        plt.close(fig)
        written.append("side_by_side.png")
    return written
