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
from dataclasses import dataclass

import torch

from qft.quant.grid import dequantize, fp16_scale, quantize, scale_zero_from_range

from .config import GPTQConfig


class HessianAccumulator:
    """Running ``2/n * sum x x^T`` over calibration tokens, in fp32 whatever the model dtype.

    The products are fp32 too: a bf16 GEMM would be ~2.6x faster on CPU, but rounding its output breaks
    the positive-definiteness GPTQ relies on (measured: the damping then has to be raised far above 1%).
    """

    def __init__(self, n_features: int, device=None):
        self.H = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device)
        for chunk in x.split(8192):  # bounded fp32 copy of a low-precision activation
            c = chunk.to(torch.float32)
            self.H.addmm_(c.t(), c)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise RuntimeError("HessianAccumulator.hessian(): no calibration tokens reached this layer.")
        return self.H * (2.0 / self.n_tokens)


@dataclass
class QuantizedWeight:
    """One solved layer: integer codes and the grid, in the original column order."""

    codes: torch.Tensor  # int32 [out, in]
    scale: torch.Tensor  # fp32 (fp16-representable) [out, n_groups]
    zero: torch.Tensor  # fp32 integers [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1 = per output row
    damp_percent: float = 0.0
    loss: float = 0.0  # GPTQ's sum of (w - q)^2 / [H^-1]_jj^2 / 2
    rel_error: float = 0.0  # ||(W-Q) X||^2 / ||W X||^2 on the calibration inputs

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scale[:, g] * (self.codes.float() - self.zero[:, g])

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The output rows ``[start, stop)``, to split a jointly solved q/k/v back into layers."""
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop], self.g_idx,
                               self.bits, self.group_size, self.damp_percent, self.loss, self.rel_error)


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100,
                 maxshrink: float = 0.8, norm: float = 2.4):
    """``scale, zero`` (each ``[rows]``) of the grid covering each row of ``w [rows, cols]``.

    With ``mse`` the range is shrunk by ``1 - i/grid`` for ``i < maxshrink*grid`` and the shrink with the
    lowest ``sum |w - q|^norm`` per row wins (all candidates evaluated at once, no Python loop over rows).
    """
    w = w.float()
    xmin, xmax = w.amin(1), w.amax(1)
    scale, zero = scale_zero_from_range(xmin, xmax, bits, sym)
    scale = fp16_scale(scale)
    if not mse:
        return scale, zero
    maxq = 2**bits - 1
    shrink = 1 - torch.arange(int(maxshrink * grid), device=w.device, dtype=torch.float32) / grid  # [P]
    s, z = scale_zero_from_range(shrink[:, None] * xmin, shrink[:, None] * xmax, bits, sym)  # [P, rows]
    s = fp16_scale(s)
    q = dequantize(quantize(w[None], s[..., None], z[..., None], maxq), s[..., None], z[..., None])
    err = (q - w[None]).abs_().pow_(norm).sum(-1)  # [P, rows]
    best = err.argmin(0)
    rows = torch.arange(w.shape[0], device=w.device)
    return s[best, rows], z[best, rows]


def _params_for_groups(W: torch.Tensor, cfg: GPTQConfig):
    """Per-group ``scale, zero [out, G]`` of ``W`` in its natural column order (groups may end short)."""
    gs = cfg.group_for(W.shape[1])
    scales, zeros = [], []
    for j in range(0, W.shape[1], gs):
        s, z = group_params(W[:, j:j + gs], cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def rtn_solve(W: torch.Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """Round-to-nearest on the same grid (a baseline, and what GPTQ reduces to with ``H = I``)."""
    W = W.detach().float()
    in_f = W.shape[1]
    gs = cfg.group_for(in_f)
    scale, zero = _params_for_groups(W, cfg)
    g_idx = torch.arange(in_f, device=W.device, dtype=torch.int32) // gs
    g = g_idx.long()
    codes = quantize(W, scale[:, g], zero[:, g], 2**cfg.bits - 1).to(torch.int32)
    return QuantizedWeight(codes, scale, zero, g_idx, cfg.bits, cfg.group_size)


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


@torch.no_grad()
def gptq_solve(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """Quantize ``W [out, in]`` against Hessian ``H [in, in]`` (both left untouched)."""
    W = W.detach().to(torch.float32).clone()
    H = H.to(device=W.device, dtype=torch.float32).clone()
    out_f, in_f = W.shape
    maxq = 2**cfg.bits - 1
    gs = cfg.group_for(in_f)
    W0, H0 = W.clone(), H.clone()

    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, 0 is exact
    H[dead, dead] = 1
    W[:, dead] = 0

    static = cfg.group_size == -1 or (cfg.desc_act and cfg.static_groups)
    if static:  # grid fixed up front from the natural-order weights
        scale_g, zero_g = _params_for_groups(W, cfg)
    perm = None
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = damped_inverse_cholesky(H, cfg.damp_percent, cfg.damp_auto_increment)

    # natural column index of each (possibly permuted) position, and its group
    natural = perm if perm is not None else torch.arange(in_f, device=W.device)
    if static:
        g_of_pos = natural // gs if cfg.group_size != -1 else torch.zeros_like(natural)
        scale_col, zero_col = scale_g[:, g_of_pos], zero_g[:, g_of_pos]
    else:  # dynamic groups: params found at each group start from the error-updated weights
        g_of_pos = torch.arange(in_f, device=W.device) // gs
        scale_g = torch.zeros(out_f, n_groups(in_f, gs), device=W.device)
        zero_g = torch.zeros_like(scale_g)
        scale_col = torch.empty_like(W)
        zero_col = torch.empty_like(W)

    Q = torch.zeros_like(W)
    losses = torch.zeros(out_f, device=W.device)
    bs = cfg.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                ge = min(col + gs, in_f)
                # the group's columns: the rest of this block (already updated) and what lies beyond it
                wg = W1[:, i:ge - i1] if ge <= i2 else torch.cat([W1[:, i:], W[:, i2:ge]], 1)
                s, z = group_params(wg, cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink)
                g = col // gs
                scale_g[:, g], zero_g[:, g] = s, z
                scale_col[:, col:ge] = s[:, None]
                zero_col[:, col:ge] = z[:, None]
            w = W1[:, i]
            d = U1[i, i]
            s, z = scale_col[:, col], zero_col[:, col]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, col] = q
            err = (w - s * (q - z)) / d
            losses.addcmul_(err, err)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        if i2 < in_f:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)

    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not static:
            g_of_pos = g_of_pos[inv]
    g_idx = (g_of_pos if not static else (natural // gs if cfg.group_size != -1 else torch.zeros_like(natural)))
    if static and perm is not None:
        g_idx = g_idx[torch.argsort(perm)]
    qw = QuantizedWeight(Q.to(torch.int32), scale_g, zero_g, g_idx.to(torch.int32), cfg.bits, cfg.group_size,
                         damp_percent=damp, loss=float(losses.sum()) / 2)
    qw.rel_error = relative_output_error(W0, qw.dequantize(), H0)
    return qw


def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Wq``: the relative squared output error on the inputs."""
    D = (W.float() - Wq.float())
    num = ((D @ H) * D).sum()
    den = ((W.float() @ H) * W.float()).sum().clamp_min(1e-30)
    return float(num / den)
