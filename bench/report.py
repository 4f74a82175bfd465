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


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# latentdiff benchmark — {m['device']}", "",
             f"torch {m['torch']}, device `{m['device_type']}`, {m['when']}; command: `{res['command']}`", "",
             "Peak memory is " + ("`torch.cuda.max_memory_allocated`." if m["device_type"] == "cuda" else
                                  "the growth of the process's `ru_maxrss` during the phase (CPU; an upper bound, "
                                  "0 when the phase stayed below an earlier peak)."), ""]
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
        if m.get("bf16_matmul_peak_flops"):
            lines += [(f"MFU = achieved FLOP/s ÷ measured bf16 matmul peak "
                      f"({m['bf16_matmul_peak_flops'] / 1e12:.1f} TFLOP/s on this card)."), ""]
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
    return "\n".join(lines).rstrip() + "\n"


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
