"""The per-layer quantization-error table (CSV + JSON) and its PNG plot, written next to the checkpoint.

Why: a single perplexity hides which layers suffer. ``rel_output_error`` = ||(W - Q) X||^2 / ||W X||^2 on
the calibration inputs (a strided sample of about 2048 of each layer's input tokens, computed from the
inputs themselves so it is never negative) points at the layers worth keeping in higher precision or a
smaller group.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

REPORT_NAME = "quant_report"


def write_report(rows: list[dict], directory) -> dict[str, Path]:
    """Write ``quant_report.{csv,json,png}`` into ``directory``; returns the paths written."""
    d = Path(directory)
    paths = {"csv": d / f"{REPORT_NAME}.csv", "json": d / f"{REPORT_NAME}.json", "png": d / f"{REPORT_NAME}.png"}
    fields = list(rows[0].keys())
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    plot_report(rows, paths["png"])
    return paths


def plot_report(rows: list[dict], png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["layer"].rsplit(".", 1)[-1] for r in rows})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for kind in kinds:
        pts = [(r["block"], r["rel_output_error"]) for r in rows if r["layer"].endswith("." + kind)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative output error  ||(W-Q)X||² / ||WX||²")
    r0 = rows[0]
    note = " (RTN: H = I, relative weight error)" if r0["method"] == "rtn" else ""
    ax.set_title(f"{r0['method'].upper()} {r0['bits']}-bit, group {r0['group_size']}: per-layer error{note}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
