"""The GPTQ solve (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), in pure torch for CPU and CUDA.

GPTQ quantizes a weight ``W [out, in]`` one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X`` of the layer's
calibration inputs, so that ``|| W X - Q X ||`` (not ``|| W - Q ||``) is what gets minimised. Rows are
independent given ``H``, which is why layers sharing an input (q/k/v, gate/up) are solved together as one
tall matrix.

The integer grid is ``qft.quant.grid``'s (GPTQ's convention, fp16-rounded scales), so what is solved here
is bit-for-bit what gets packed and what QAT trains against.
"""
from __future__ import annotations

import math

import torch

from qft.quant.grid import (
    clipped_params,
    fp16_scale,
    quantize,
    scale_zero_from_range,
)
from qft.quant.qweight import QuantizedWeight

from .config import GPTQConfig
from .prune import PrunedWeight, block_mask, pattern_nm


class HessianAccumulator:
    """Running ``2/n * sum x x^T`` over calibration tokens, accumulated in fp32 whatever the model dtype.

    With ``low_precision`` (``GPTQConfig.hessian_dtype`` 'bfloat16', or 'auto' on bf16 activations) the
    products are a bf16 GEMM over 512 tokens at a time: bf16 x bf16 products are exact, only each partial
    sum is rounded to bf16 (2^-9 relative) before the fp32 accumulation, and those roundings average out
    over the chunks. Measured on SmolLM2-135M's layers 0, 2, 10 and 29 with 128 x 512 WikiText-2 tokens:
    relative Hessian error 0.5-3e-4 and the same GPTQ output error as fp32, at 2.5x the speed; only the
    near-singular Hessian of layer 0's o_proj needed the damping raised (1% -> 1.25%). 8192-token chunks
    round 16x fewer, larger sums, and there the damping had to go to 5%.
    """

    CHUNK = 512

    def __init__(self, n_features: int, device=None, low_precision: bool = False):
        self.H = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n_tokens = 0
        self.low_precision = low_precision

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device)
        if self.low_precision and x.dtype == torch.bfloat16:
            for c in x.split(self.CHUNK):
                self.H.add_(c.t() @ c)
        else:
            for chunk in x.split(8192):  # bounded fp32 copy of a low-precision activation
                c = chunk.to(torch.float32)
                self.H.addmm_(c.t(), c)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise RuntimeError("HessianAccumulator.hessian(): no calibration tokens reached this layer.")
        return self.H * (2.0 / self.n_tokens)


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
                 maxshrink: float = 0.8, norm: float = 2.4):
    """``scale, zero`` (each ``[rows]``) of the grid covering each row of ``w [rows, cols]``: min-max, or
    with ``mse`` the clipping search (``qft.quant.grid.clipped_params``)."""
    if mse:
        return clipped_params(w, bits, sym, grid, maxshrink, norm)
    w = w.float()
    scale, zero = scale_zero_from_range(w.amin(1), w.amax(1), bits, sym)
    return fp16_scale(scale), zero


def params_for_groups(W: torch.Tensor, cfg: GPTQConfig):
    """Per-group ``scale, zero [out, G]`` of ``W`` in its natural column order (groups may end short)."""
    gs = cfg.group_for(W.shape[1])
    scales, zeros = [], []
    for j in range(0, W.shape[1], gs):
        s, z = group_params(W[:, j:j + gs], cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def rtn_solve(W: torch.Tensor, cfg: GPTQConfig, mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest on the same grid (a baseline, and what GPTQ reduces to with ``H = I``); weights
    under ``mask`` (True = pruned) get their group's zero point, which dequantizes to exactly 0."""
    W = W.detach().float()
    in_f = W.shape[1]
    gs = cfg.group_for(in_f)
    scale, zero = params_for_groups(W, cfg)
    g_idx = torch.arange(in_f, device=W.device, dtype=torch.int32) // gs
    g = g_idx.long()
    codes = quantize(W, scale[:, g], zero[:, g], 2**cfg.bits - 1)
    if mask is not None:
        codes = torch.where(mask.to(W.device), zero[:, g], codes)
    return QuantizedWeight(codes.to(torch.int32), scale, zero, g_idx, cfg.bits, cfg.group_size)


def damped_inverse_cholesky(H: torch.Tensor, damp_percent: float, increment: float):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and the damp that worked.

    A factorisation that fails (H singular or badly conditioned, e.g. too few calibration tokens) is
    retried with ``damp_percent + increment`` until it succeeds; giving up needs damp >= 1.
    """
    mean_diag = torch.diag(H).mean()
    eye = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent
    while True:
        Hd = H.clone()
        Hd[eye, eye] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        damp += increment
        if damp >= 1.0:
            raise torch.linalg.LinAlgError(
                f"GPTQ: the Hessian stays non-positive-definite up to damp_percent={damp:.4f}; the calibration "
                "data probably does not reach this layer (too few or constant tokens).")


def column_order(diag: torch.Tensor, natural_group: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor | None:
    """The order GPTQ visits the input columns in, or ``None`` for the natural order.

    ``desc_act``: by decreasing Hessian diagonal, so the columns that carry the most input energy are
    quantized first, while the most columns are left to absorb their error (GPTQ's act-order).
    ``act_group_aware``: group-aware reordering (GAR; Gafni, Karnieli & Hanani, CVPRW 2025,
    arXiv:2505.14638): groups by decreasing largest diagonal, and columns by decreasing diagonal inside
    each group. Each group stays contiguous, so its grid is fitted to the error-updated weights as in the
    natural order, and ``g_idx`` stays ``i // group_size`` (no reordering in the inference kernel).
    """
    if cfg.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if not cfg.act_group_aware:
        return None
    n_g = int(natural_group.max()) + 1
    group_max = torch.full((n_g,), float("-inf"), device=diag.device).scatter_reduce(0, natural_group, diag, "amax")
    rank = torch.empty(n_g, dtype=torch.long, device=diag.device)
    rank[torch.argsort(group_max, descending=True, stable=True)] = torch.arange(n_g, device=diag.device)
    within = torch.argsort(diag, descending=True, stable=True)  # then a stable sort by group rank keeps it
    return within[torch.argsort(rank[natural_group[within]], stable=True)]


@torch.no_grad()
def gptq_solve(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, report_error: bool = True,
               grid: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None):
    """Quantize ``W [out, in]`` against Hessian ``H [in, in]`` (both left untouched).

    ``grid`` (``scale, zero``, each ``[out, n_groups]`` in natural group order) fixes the grid instead of
    fitting it: only the codes are solved. That is the GPTQ refinement of a grid QAT learned. A
    ``QuantizedWeight`` as ``grid`` brings its own width and group size (a GGUF block format's,
    ``qft.quant.ggml``); a zero point off the integers (an offset grid, ``scale * q - offset``) rounds
    ``w / scale + zero`` as a whole.

    Pruning (``cfg.sparsity``, ``qft.export.prune``): weights under ``mask`` [out, in] (True = pruned;
    magnitude or Wanda's choice) become zero, or SparseGPT chooses them block by block here; their
    error is compensated like a rounding error. ``cfg.method == "none"`` prunes without rounding and
    returns a ``PrunedWeight``.

    The solve runs on ``W``'s transpose, so the column being quantized and the trailing columns it
    updates are contiguous rows; per column that is one fused rank-1 update of the rest of the block
    (128 columns by default, GPTQ's lazy batch), and each block's error reaches the remaining columns
    as one GEMM. ``report_error`` also computes ``rel_error`` (two GEMMs; the export driver does it per
    layer instead).
    """
    W = W.detach().to(torch.float32)
    H0 = H.to(device=W.device, dtype=torch.float32)
    H = H0.clone()
    out_f, in_f = W.shape
    bits, gs, group_size = cfg.bits, cfg.group_for(in_f), cfg.group_size
    if isinstance(grid, QuantizedWeight):
        bits, gs, group_size, grid = grid.bits, grid.group_size, grid.group_size, (grid.scale, grid.zero)
    maxq = 2**bits - 1
    Wt = W.t().contiguous()  # [in, out]: column j of W is row j here

    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, 0 is exact
    H[dead, dead] = 1
    Wt[dead] = 0

    natural_group = torch.arange(in_f, device=W.device) // gs
    static = grid is not None or cfg.group_size == -1 or (cfg.desc_act and cfg.static_groups)
    offset_grid = grid is not None and not bool((grid[1] == grid[1].round()).all())
    if grid is not None:  # given (learned) grid, as [G, out]
        if grid[0].shape != (out_f, n_groups(in_f, gs)):
            raise ValueError(f"gptq_solve(grid=...): scales of shape {tuple(grid[0].shape)} do not fit a weight "
                             f"{out_f}x{in_f} with group size {gs}.")
        scale_g, zero_g = (t.to(W.device, torch.float32).t().contiguous() for t in grid)
    elif static:  # grid fixed up front from the natural-order weights, as [G, out]
        scale_g, zero_g = (t.t().contiguous() for t in params_for_groups(Wt.t(), cfg))
    else:
        scale_g = torch.zeros(n_groups(in_f, gs), out_f, device=W.device)
        zero_g = torch.zeros_like(scale_g)
    perm = column_order(torch.diag(H), natural_group, cfg)
    natural = perm if perm is not None else torch.arange(in_f, device=W.device)
    rounding = cfg.method != "none"
    choose = cfg.sparsity > 0 and cfg.prune_method == "sparsegpt" and mask is None
    nm = pattern_nm(cfg.sparsity_pattern) if choose else None
    Mt = None if mask is None else mask.to(W.device).t().contiguous()  # [in, out], True = pruned
    if perm is not None:
        Wt, H = Wt[perm], H[perm][:, perm]
        Mt = None if Mt is None else Mt[perm]
    U, damp = damped_inverse_cholesky(H, cfg.damp_percent, cfg.damp_auto_increment)

    # the group whose grid each position uses: desc_act with dynamic groups numbers them in visiting
    # order (HF's g_idx then maps natural columns to those); every other mode keeps natural groups
    pos_group = natural_group if (cfg.desc_act and not static) else natural_group[natural]
    pg = pos_group.tolist()
    starts = {}  # position -> end of the contiguous run of its group (dynamic grids are fitted there)
    if not static:
        run = 0
        for p in range(1, in_f + 1):
            if p == in_f or pg[p] != pg[run]:
                starts[run] = p
                run = p

    Qt = torch.empty_like(Wt)
    loss = 0.0
    bs = cfg.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = Wt[i1:i2]  # a view: its updates land in Wt, which dynamic grids read
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d_t = torch.diag(U1)
        d = d_t.tolist()
        M1 = None if Mt is None else Mt[i1:i2]
        if choose and nm is None:  # SparseGPT: the block's mask, from the weights as the block begins
            M1 = block_mask(W1, d_t, cfg.sparsity, cfg.sparsity_pattern)
        elif choose:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            if choose and nm is not None and i % nm[1] == 0:  # n of the next m columns, as they are now
                M1[i:i + nm[1]] = block_mask(W1[i:i + nm[1]], d_t[i:i + nm[1]], cfg.sparsity, cfg.sparsity_pattern)
            w = W1[i]
            err = E1[i]
            if not rounding:
                kept = w.masked_fill(M1[i], 0.0)
                Qt[col] = kept
                torch.sub(w, kept, out=err).div_(d[i])
            else:
                if col in starts:
                    g = pg[col]
                    s, z = group_params(Wt[col:starts[col]].t(), cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid,
                                        cfg.mse_maxshrink)
                    scale_g[g], zero_g[g] = s, z
                s, z = scale_g[pg[col]], zero_g[pg[col]]
                q = (torch.div(w, s).add_(z).round_() if offset_grid
                     else torch.div(w, s).round_().add_(z)).clamp_(0, maxq)
                if M1 is not None:
                    q = torch.where(M1[i], z, q)
                Qt[col] = q
                torch.sub(w, (q - z).mul_(s), out=err).div_(d[i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        loss += float(E1.square().sum())
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)

    inv = torch.argsort(natural)
    if not rounding:
        pw = PrunedWeight(Qt[inv].t().contiguous(), damp_percent=damp, loss=loss / 2)
        if report_error:
            pw.rel_error = relative_output_error(W, pw.weight, H0)
        return pw
    qw = QuantizedWeight(Qt[inv].t().to(torch.int32).contiguous(), scale_g.t().contiguous(),
                         zero_g.t().contiguous(), pos_group[inv].to(torch.int32), bits, group_size,
                         damp_percent=damp, loss=loss / 2)
    if report_error:
        qw.rel_error = relative_output_error(W, qw.dequantize(), H0)
    return qw


def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Wq``: the relative squared output error on the inputs."""
    D = (W.float() - Wq.float())
    num = ((D @ H) * D).sum()
    den = ((W.float() @ H) * W.float()).sum().clamp_min(1e-30)
    return float(num / den)


def direct_output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    """``||X (W - Wq)^T||^2 / ||X W^T||^2`` on inputs ``X [tokens, in]``: the relative squared output error,
    computed from the inputs themselves, so it is never negative (a bf16-accumulated Hessian's quadratic
    form can be, where the error lies in its near-null directions)."""
    X = X.to(torch.float32)
    W32 = W.to(X.device, torch.float32)
    num = (X @ (W32 - Wq.to(X.device, torch.float32)).t()).square().sum()
    den = (X @ W32.t()).square().sum().clamp_min(1e-30)
    return float(num / den)
