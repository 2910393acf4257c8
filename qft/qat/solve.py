"""A solved grid at QAT start: GPTQ picks every layer's scales, zeros and codes once, then training
moves the adapters (or the weights) against that fixed grid.

Why: min-max fake-quant of ``W_nf4 + s * B @ A``, trained on the task alone, keeps the task but loses
the base's general text (WikiText-2 perplexity 64 on the demo; BENCHMARKS.md, "Deploy what you
trained"). Blending the codes toward the base after training wins general text back and costs the task
that training reached. Solving the grid at QAT start, with the export's own anchored GPTQ (task windows
reproduce the fine-tune so far, general windows the released base; ``qft.export.sequential``), puts the
model on a grid that already keeps general text; the QAT phase then trains the task back on that grid,
and the export writes the result as it is (``qat_grid="keep"``, bit for bit). This is EfficientQAT's
order (a block-wise solve, then end-to-end training of what stays free), with GPTQ as the solve.

Lifecycle (driven by ``QATCallback``):
- ``QATConfig(init=GridSolve(...))``: every field is validated (the general-text file exists and is not
  empty, fractions in range) before any model is loaded.
- ``on_fit_start``: the calibration windows are built (the task from the trainer's DataModule, general
  text from the file), so missing data fails before the first step.
- at ``start_step``: the model is merged (``qft.export.merge``, into the base it trains on) and solved
  (``quantize_model``); each fake-quant layer takes its grid (``fix_grid``); rank 0's grid is broadcast
  so every rank trains the same one.
- checkpoints: the grid is part of each layer's state (buffers and extra state); a resumed run does not
  solve again.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

METHODS = ("gptq", "rtn")


@dataclass
class GridSolve:
    """How the grid is solved at ``start_step`` (``QATConfig.init``)."""

    method: Literal["gptq", "rtn"] = field(default="gptq", metadata={
        "help": "gptq: GPTQ on the calibration windows; rtn: round-to-nearest of the merged weight (no data)."})
    general_calibration: Optional[str] = field(default=None, metadata={
        "help": "A text file of general text (e.g. WikiText-2 test). Its windows are solved toward the released "
                "base, which is what keeps the base's general ability. None: task windows only (general ability "
                "is not protected)."})
    general_start: float = field(default=0.0, metadata={
        "help": "Skip this fraction of the general text (0.5 with WikiText-2 test: its second half, disjoint from "
                "the evaluation windows)."})
    general_fraction: float = field(default=0.25, metadata={
        "help": "The fraction of calibration windows taken from the general text, in [0, 1]."})
    n_samples: int = field(default=64, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per calibration window (capped at the context)."})

    def __post_init__(self):
        def arg(name, value):
            return f"QATCallback(init=GridSolve({name}={value!r}))"

        if self.method not in METHODS:
            raise ValueError(f"{arg('method', self.method)}: allowed {list(METHODS)}. Hint: 'gptq'.")
        g = self.general_calibration
        if g is not None:
            if not isinstance(g, (str, os.PathLike)):
                raise TypeError(f"{arg('general_calibration', g)}: expected the path of a text file, or None.")
            path = Path(g)
            if not path.is_file():
                raise FileNotFoundError(f"{arg('general_calibration', str(g))}: no such file. Pass a text file of "
                                        "general text (e.g. ../shared/data/wikitext2_test.raw), or None to solve "
                                        "on the task alone.")
            if not path.read_text(encoding="utf-8", errors="replace").strip():
                raise ValueError(f"{arg('general_calibration', str(g))}: the file is empty. Pass a text file of "
                                 "general text, or None to solve on the task alone.")
            self.general_calibration = str(g)
        for name, upper, closed in (("general_fraction", 1, True), ("general_start", 1, False)):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v and (v <= upper if closed
                                                                                          else v < upper)
            if not ok:
                rng = "[0, 1]" if closed else "[0, 1)"
                raise ValueError(f"{arg(name, v)}: a number in {rng}. Hint: general_fraction=0.25, "
                                 "general_start=0.5 for WikiText-2 test.")
        for name, low in (("n_samples", 1), ("seq_len", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{arg(name, v)}: an integer >= {low} (default 64).")

    @property
    def general_rows(self) -> int:
        """Calibration windows of general text (0 without a file)."""
        return round(self.n_samples * self.general_fraction) if self.general_calibration else 0

    def to_dict(self) -> dict:
        return asdict(self)


def as_grid_solve(value) -> GridSolve | None:
    """``QATConfig.init`` from what a user or YAML gives: ``"minmax"``/None, ``"gptq"``/``"rtn"``, a dict or
    a ``GridSolve``."""
    if value is None or value == "minmax":
        return None
    if isinstance(value, GridSolve):
        return value
    if isinstance(value, str) and value in METHODS:
        return GridSolve(method=value)
    if isinstance(value, dict):
        try:
            return GridSolve(**value)
        except TypeError as e:
            raise ValueError(f"QATCallback(init={value!r}): {e}. Fields: method, general_calibration, "
                             "general_start, general_fraction, n_samples, seq_len.") from None
    raise ValueError(f"QATCallback(init={value!r}): allowed 'minmax' (scales from each step's weight), 'mse', 'gptq', "
                     "'rtn', or qft.qat.GridSolve(...). Hint: init=GridSolve(general_calibration='wiki.txt').")


def calibration(solve: GridSolve, datamodule, tokenizer, model) -> torch.Tensor:
    """The windows the solve runs on: task windows from ``datamodule``, general text last."""
    from qft.export.calibration import calibration_mix, model_max_length, skip_start

    general = skip_start(solve.general_calibration, solve.general_start) if solve.general_calibration else None
    return calibration_mix(datamodule, general, tokenizer, solve.n_samples, solve.seq_len,
                           solve.general_fraction if general is not None else 0.0,
                           max_length=model_max_length(model))


@torch.no_grad()
def solve_grids(model, scheme, solve: GridSolve, tokens: torch.Tensor | None, base_name: str | None) -> dict:
    """``{HF layer name: QuantizedWeight}``: the grid GPTQ (or RTN) gives the model as it is now.

    The fine-tune so far is merged into the base it trains on; general rows of ``tokens`` (the last
    ``solve.general_rows``) are solved toward ``base_name``'s released weights when it is given.
    """
    from qft.export.config import GPTQConfig
    from qft.export.merge import merge_adapters
    from qft.export.pipeline import base_weights, resolve_dtype
    from qft.export.sequential import quantize_model

    group = scheme.group_size if scheme.granularity == "per_group" else -1
    # the export's own solver defaults (group-aware reordering keeps g_idx natural, so the grid fits fake-quant)
    cfg = GPTQConfig(bits=scheme.bits, group_size=group, sym=scheme.symmetric, method=solve.method)
    if solve.method == "rtn":  # no data, no blocks: any model with fake-quant layers
        from qft import layers
        from qft.export.gptq import rtn_solve

        from .layer import _WeightFakeQuantMixin

        return {n: rtn_solve(layers.weight(m), cfg) for n, m in layers.linear_layers(layers.unwrap(model)).items()
                if isinstance(m, _WeightFakeQuantMixin)}
    device = next(model.parameters()).device
    merged = merge_adapters(model, base_name, merge_into="trained")
    compute = resolve_dtype("auto", device)
    for p in merged.parameters():
        p.data = p.data.to(compute)
    rows = solve.general_rows if base_name is not None else 0
    anchor = base_weights(base_name) if rows else None
    quantized, _ = quantize_model(merged, cfg, tokens, device=device, progress=False, anchor=anchor,
                                  anchor_rows=rows)
    return quantized


def install(model, quantized: dict) -> int:
    """Give every fake-quant layer of ``model`` its solved grid; returns how many took one."""
    from qft import layers

    from .layer import _WeightFakeQuantMixin

    found = {n: m for n, m in layers.linear_layers(layers.unwrap(model)).items()
             if isinstance(m, _WeightFakeQuantMixin)}
    missing = sorted(set(found) - set(quantized))
    if missing:
        raise RuntimeError(f"QAT grid solve: no solved grid for {missing[:3]} (of {len(missing)}); the solve and the "
                           "fake-quant layers disagree on the model's layers.")
    for name, m in found.items():
        m.fix_grid(quantized[name])
    return len(found)


def broadcast(model) -> None:
    """Every rank trains rank 0's grid (a solve on each rank could differ in the last bit)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    from .prepare import fake_quant_modules

    for _, m in fake_quant_modules(model):
        for t in m.grid_tensors():
            dist.broadcast(t, src=0)


def solve_and_install(pl_module, scheme, solve: GridSolve, tokens, base_name) -> dict:
    """Solve, install and broadcast; returns what happened, for the log."""
    t0 = time.perf_counter()
    # a LightningModule holds the model in .model; a Hugging Face model's own .model is its inner decoder
    model = pl_module if hasattr(pl_module, "config") else getattr(pl_module, "model", pl_module)
    was_training = model.training
    model.eval()
    try:
        n = install(model, solve_grids(model, scheme, solve, tokens, base_name))
    finally:
        model.train(was_training)
    broadcast(model)
    return {"layers": n, "method": solve.method, "general_rows": solve.general_rows if base_name else 0,
            "seconds": round(time.perf_counter() - t0, 1)}
