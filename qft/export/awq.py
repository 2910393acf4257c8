"""AWQ (Lin et al., MLSys 2024, arXiv:2306.00978): scale the input channels that matter before rounding.

A few input channels carry most of a layer's activation energy; rounding the weight columns they
multiply costs the most output error. Multiplying column ``j`` by ``s_j > 1`` (and dividing the input
channel by ``s_j``, folded into the norm or linear that produces it) gives those columns a finer share
of their group's grid. The paper searches ``s = mean|x|^a`` over a grid of ``a`` per set of layers
that share an input, then optionally shrinks each group's range (clipping).

Lifecycle (a pre-pass of ``quantize_model`` for ``method="awq"`` and ``"awq_gptq"``):

1. **pairs**: ``qft.export.fold.smoothing_pairs`` finds, by running the model, each norm with the
   linears reading its output (q/k/v, gate/up) and each linear feeding another linearly (up -> down;
   v -> o where the shapes allow, which grouped-query attention does not);
2. **statistics**, block by block on the full-precision block: each input's Hessian ``H = X^T X`` and
   mean ``|x|`` per channel. Scaling is an exact fold, so the block's outputs (the next block's inputs)
   do not change and one forward per block serves everything;
3. **scale search** per pair: for ``a`` in ``k / n_grid``, AutoAWQ's "duo" scales
   ``s = mean|x|^a / mean|w|^(1-a)`` normalised to ``sqrt(max s * min s) = 1``, the candidate's error
   ``tr((W - Q(W s)/s) H (W - Q(W s)/s)^T)``: the layers' output error on the calibration inputs,
   read from ``H`` instead of running the block 20 times as AutoAWQ and llm-compressor do;
4. **fold** the best ``s`` and carry ``H`` and ``mean|x|`` through it (``H / s s^T``). Each fold is
   exact for its producer's norm convention (Gemma's ``1 + w`` too) and checked on its block before any
   rounding (``qft.export.fold.FoldCheck``); one that is not exact is undone, left out and reported;
5. **clip** (``method="awq"``): per layer (but q/k, whose outputs meet in a softmax, as in AutoAWQ), the
   shrink of each group's range with the least output error of that group, from ``H``'s diagonal
   blocks (AutoAWQ's per-group objective); the weights are then rounded inside the clipped grid.

``method="awq"`` hands the rounded grids to ``quantize_model`` as fixed; ``"awq_gptq"`` lets GPTQ solve
the scaled model. The tensor math (``search_scale``, ``search_clip``) sits apart from the pass.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .blocks import block_linears, discover_groups, find_decoder_blocks, run_block
from .config import GPTQConfig
from .gptq import HessianAccumulator, QuantizedWeight, rtn_solve

N_GRID = 20  # AutoAWQ's grid of the exponent and of the clipping shrink
MAX_SHRINK = 0.5
NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ's avoid_clipping: their outputs meet in a softmax
FOLD_CHECK_TOKENS = 128  # of the first calibration window: the batch each fold is checked on


def _rtn(W: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    return rtn_solve(W, cfg).dequantize()


def output_error(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(D H D^T)``: the squared output error of a weight error ``D`` on the inputs behind ``H``."""
    return ((D @ H) * D).sum()


def weight_mean(W: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: each weight's magnitude relative to its group's largest, averaged per column."""
    g = W.abs().reshape(W.shape[0], -1, group)
    return (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(0)


@torch.no_grad()
def search_scale(W: torch.Tensor, H: torch.Tensor, x_mean: torch.Tensor, cfg: GPTQConfig,
                 n_grid: int = N_GRID, duo: bool = True) -> tuple[torch.Tensor, float, float]:
    """``(s, a, error / error of plain rounding)``: the input-channel scale of the stacked weights ``W``
    [out, in] with the least output error after rounding (see the module docstring, step 3); ``a`` is
    None when no scale beats plain rounding (then ``s`` is all ones)."""
    W, H, x_mean = W.float(), H.float(), x_mean.float()
    w_mean = weight_mean(W, cfg.group_for(W.shape[1])) if duo else None
    base = float(output_error(W - _rtn(W, cfg), H))  # s = 1 (plain rounding) is a candidate too: never worse
    best = (base, torch.ones_like(x_mean), None)
    for k in range(n_grid):
        a = k / n_grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo else x_mean.pow(a)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = float(output_error(W - _rtn(W * s, cfg) / s, H))
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2], best[0] / base if base else 1.0


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """``W`` clamped, per (row, group), to the fraction of its largest magnitude whose rounding leaves
    the least output error of that group (AutoAWQ's clip search, its objective read from ``H``)."""
    out_f, in_f = W.shape
    gs = cfg.group_for(in_f)
    if in_f % gs:
        return W
    G = in_f // gs
    W = W.float()
    Wg = W.reshape(out_f, G, gs)
    Hb = torch.stack([H[j * gs:(j + 1) * gs, j * gs:(j + 1) * gs] for j in range(G)]).float()
    top = Wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((out_f, G), float("inf"), device=W.device)
    best_r = torch.ones(out_f, G, 1, device=W.device)
    for k in range(int(max_shrink * n_grid)):
        r = 1 - k / n_grid
        lim = top * r
        D = Wg - _rtn(torch.maximum(torch.minimum(Wg, lim), -lim).reshape(out_f, in_f), cfg).reshape(out_f, G, gs)
        err = torch.einsum("ogi,gij,ogj->og", D, Hb, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better[..., None], torch.full_like(best_r, r), best_r)
    lim = top * best_r
    return torch.maximum(torch.minimum(Wg, lim), -lim).reshape(out_f, in_f)


class _Stats:
    """One input's Hessian (``qft.export.gptq.HessianAccumulator``: bf16 products for bf16 activations, as
    GPTQ's) and ``mean |x|`` per channel, over every calibration token."""

    def __init__(self, n: int, device, low_precision: bool):
        self.acc = HessianAccumulator(n, device, low_precision)
        self.abs = torch.zeros(n, device=device)
        self.fold = torch.ones(n, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.acc.add(x)
        self.abs += x.reshape(-1, x.shape[-1]).float().abs().sum(0)

    @property
    def H(self) -> torch.Tensor:
        """The Hessian of the (folded) input ``x / s``."""
        return self.acc.hessian() / (self.fold[:, None] * self.fold[None, :])

    @property
    def x_mean(self) -> torch.Tensor:
        return self.abs / self.acc.n_tokens / self.fold

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The input is now ``x / s`` (after a fold)."""
        self.fold = self.fold * s


@torch.no_grad()
def awq_prepass(model: nn.Module, cfg: GPTQConfig, tokens: torch.Tensor, device=None, batch_size: int = 16,
                offload=None, progress: bool = True) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Search and fold AWQ scales into ``model`` (in place, exact in full precision); returns the rounded
    grids for ``method="awq"`` (empty for ``"awq_gptq"``) and one report row per pair, with the reason
    when its fold was refused (``fold_refused``; the pair is then rounded unscaled)."""
    from tqdm.auto import tqdm

    from .fold import FoldCheck, smoothing_pairs
    from .offload import Offload
    from .sequential import capture_block_inputs

    prefix, blocks = find_decoder_blocks(model)
    device = torch.device(device or next(model.parameters()).device)
    offload = offload or Offload("none", device)
    linears = {f"{prefix}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in block_linears(b).items()}
    pairs = smoothing_pairs(model, linears, tokens[:1, :32])
    check = FoldCheck(model, linears, tokens[:1, :FOLD_CHECK_TOKENS])
    cache = capture_block_inputs(model, tokens, batch_size, device, offload)
    groups = None
    grids: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []
    for i, block in enumerate(tqdm(blocks, desc="AWQ search", unit="block", disable=not progress)):
        t0 = time.perf_counter()
        home = next(block.parameters()).device
        block.to(device)
        lins = block_linears(block)
        if groups is None:
            groups = discover_groups(block, *cache[0])
        head_of = {n: g[0] for g in groups for n in g}
        low = cfg.hessian_dtype == "bfloat16" or cfg.hessian_dtype == "auto" and cache[0][0].dtype == torch.bfloat16
        stats = {g[0]: _Stats(lins[g[0]].in_features, device, low) for g in groups}
        handles = [lins[h].register_forward_pre_hook(lambda m, a, st=st: st.add(a[0])) for h, st in stats.items()]
        nxt = offload.inputs()  # the fp block's outputs: the folds below leave them unchanged
        try:
            for hidden, kw in cache:
                nxt.append(run_block(block, hidden, kw), kw)
        finally:
            for h in handles:
                h.remove()
        mine = f"{prefix}.{i}."
        for producer, names in pairs:
            if not names[0].startswith(mine):
                continue
            local = [n[len(mine):] for n in names]
            st = stats[head_of[local[0]]]
            W = torch.cat([lins[n].weight.detach().float() for n in local], 0)
            s, a, ratio = search_scale(W, st.H, st.x_mean, cfg)
            refused = a is not None and not check.apply(producer, names, s)  # a None: s is all ones
            if a is not None and not refused:
                st.scale_inputs(s)
            rows.append(dict(block=i, producer=producer, layers=",".join(local), alpha=None if refused else a,
                             error_ratio=1.0 if refused else ratio, max_scale=float(s.max()), min_scale=float(s.min()),
                             fold_refused=check.refused[-1]["reason"] if refused else None))
        if cfg.method == "awq":
            for n, lin in lins.items():
                st = stats[head_of[n]]
                W = lin.weight.detach().float()
                if not n.endswith(NO_CLIP):
                    W = search_clip(W, st.H, cfg)
                grids[f"{mine}{n}"] = rtn_solve(W, cfg).cpu()
        block.to(home)
        if rows and rows[-1]["block"] == i:
            rows[-1]["block_s"] = time.perf_counter() - t0
        cache = nxt
        del stats
    return grids, rows
