"""Tensor math of the GPTQ integer grid: ranges to (scale, zero), quantise, dequantise.

Pure functions with no module state, shared by fake-quant (QAT), RTN and GPTQ. The convention is
GPTQ/AutoGPTQ's, so that what we train against is bit-for-bit what we export:
``x_hat = scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)``.
"""
from __future__ import annotations

import torch

from .scheme import QuantScheme


def scale_zero_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale and integer zero point for ranges ``[xmin, xmax]`` (any shape; broadcast together).

    The range is widened to include 0 (so zero padding stays exact); an all-zero range becomes
    [-1, 1] to avoid a zero scale.
    """
    maxq = 2**bits - 1
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    # GPTQ v1 checkpoints store ``zero - 1`` as unsigned bits, so zero=0 (a group with no negative
    # weight) cannot be written. Such groups use zero=1 and stretch the scale so xmax stays on the grid.
    low = zero < 1
    scale = torch.where(low, xmax / (maxq - 1), scale)
    return scale, torch.where(low, torch.ones_like(zero), zero)


def quantize(x, scale, zero, maxq: int):
    """Integer codes (as float) of ``x`` on the grid."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q, scale, zero):
    return scale * (q - zero)


def fake_quantize(x, scale, zero, maxq: int):
    """Quantise then dequantise (no gradient trick; see ``qft.qat`` for the STE)."""
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def weight_params(w: torch.Tensor, scheme: QuantScheme, mse: bool = False):
    """Per-group (or per-channel) ``scale, zero`` of a weight ``[out, in]``, shaped ``[out, n_groups]``.

    ``mse``: each group's range shrunk by the clipping search (``clipped_params``) instead of min-max."""
    out_f, in_f = w.shape
    g = scheme.group_for(in_f)
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    if mse:
        scale, zero = clipped_params(wg.reshape(-1, g), scheme.bits, scheme.symmetric)
        return scale.view(out_f, -1), zero.view(out_f, -1)
    scale, zero = scale_zero_from_range(wg.amin(-1), wg.amax(-1), scheme.bits, scheme.symmetric)
    return fp16_scale(scale), zero


def clipped_params(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 100, maxshrink: float = 0.8,
                   norm: float = 2.4, chunk: int = 4096):
    """``scale, zero`` (each ``[rows]``, fp16-exact scales) of the clipped range of each row of ``w``.

    Each row's range is shrunk by ``1 - i/grid`` for ``i < maxshrink*grid``, and the shrink with the
    lowest ``sum |w - q|^norm`` wins (the clipping search of GPTQ's reference code, norm 2.4). Why: an
    outlier stretches a min-max range and leaves the other weights few levels; a narrower range that
    clips it rounds the rest finer. Rows are searched ``chunk`` at a time so memory stays bounded
    (``grid * maxshrink`` candidates per row).
    """
    w = w.float()
    maxq = 2**bits - 1
    xmin, xmax = w.amin(1), w.amax(1)
    shrink = 1 - torch.arange(int(maxshrink * grid), device=w.device, dtype=torch.float32) / grid  # [P]
    scales, zeros = [], []
    for r in range(0, max(w.shape[0], 1), chunk):
        wc, lo, hi = w[r:r + chunk], xmin[r:r + chunk], xmax[r:r + chunk]
        s, z = scale_zero_from_range(shrink[:, None] * lo, shrink[:, None] * hi, bits, symmetric)  # [P, rows]
        s = fp16_scale(s)
        q = dequantize(quantize(wc[None], s[..., None], z[..., None], maxq), s[..., None], z[..., None])
        best = (q - wc[None]).abs_().pow_(norm).sum(-1).argmin(0)
        rows = torch.arange(wc.shape[0], device=w.device)
        scales.append(s[best, rows])
        zeros.append(z[best, rows])
    return torch.cat(scales), torch.cat(zeros)


def activation_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero of an activation range ``[xmin, xmax]`` (any shape).

    A symmetric grid maps ``absmax`` to the integer ``2^(bits-1) - 1`` (127 for int8: vLLM's dynamic
    per-token kernel computes ``absmax / 127`` at run time, so qft's reference is the runtime's). Two
    reasons not to reuse the weight grid (``scale_zero_from_range``): its ``2 absmax / 255`` puts a
    negative ``-absmax`` exactly on a rounding tie (-127.5), which fp32 noise then sends to -127 or -128,
    so two correct computations of one token disagree by a whole step on its largest element; and its
    GPTQ convention keeps ``xmin = 0`` for a range with no negative value, clipping at half the maximum.
    """
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        half = 2 ** (bits - 1)
        return absmax / (half - 1), torch.full_like(absmax, float(half))
    return scale_zero_from_range(xmin, xmax, bits, False)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16, as the checkpoint stores them, so fake-quant and export agree exactly."""
    return scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()


def expand_groups(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in_features]`` by repeating each group's value."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def rtn_quantize_weight(w: torch.Tensor, scheme: QuantScheme):
    """Round-to-nearest: ``(codes [out,in] int, scale [out,n_groups], zero [out,n_groups])``."""
    scale, zero = weight_params(w, scheme)
    in_f = w.shape[1]
    q = quantize(w.float(), expand_groups(scale, in_f), expand_groups(zero, in_f), scheme.maxq)
    return q.to(torch.int32), scale, zero


def rtn_fake_quant_weight(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    q, scale, zero = rtn_quantize_weight(w, scheme)
    in_f = w.shape[1]
    return dequantize(q.float(), expand_groups(scale, in_f), expand_groups(zero, in_f)).to(w.dtype)
