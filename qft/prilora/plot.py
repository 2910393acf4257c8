"""PNG of rank and A-sparsity per decoder layer, written next to the checkpoints at fit end."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``stem-1.png``, ``stem-2.png``... so an existing plot is never overwritten."""
    path = folder / name
    stem, suffix = path.stem, path.suffix
    k = 1
    while path.exists():
        path = folder / f"{stem}-{k}{suffix}"
        k += 1
    return path


def plot_layers(rows: list, folder, name: str = "prilora_layers.png", title: str = "PRILoRA") -> Path:
    """Bar charts of ``rank`` and ``sparsity`` (fraction of A pruned) per layer from ``rows``
    (``PRILoRACallback.layer_report()``). Written to a temp file and renamed; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(5.0, 0.25 * len(rows) + 3), 5.0))
    ax_r, ax_s = fig.subplots(2, 1, sharex=True)
    ax_r.bar(layers, [r["rank"] for r in rows], color="tab:blue")
    ax_r.set_ylabel("LoRA rank")
    ax_r.set_title(title)
    ax_s.bar(layers, [100.0 * r["sparsity"] for r in rows], color="tab:orange")
    ax_s.set_ylabel("A pruned (%)")
    ax_s.set_xlabel("decoder layer")
    ax_s.set_ylim(0, 100)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=".prilora-", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        target = _free_name(folder, name)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
