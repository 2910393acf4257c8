"""GPTQ int32 bit packing (AutoGPTQ/transformers "gptq" checkpoint format, v1 zero points).

Codes are laid out as a little-endian bit stream: every 32 consecutive codes along the packed
dimension occupy ``bits`` int32 words, code ``k`` at bits ``[bits*k, bits*k + bits)``. For 2, 4 and
8 bits this is the familiar "8 nibbles per int32"; for 3 bits it is the same stream, which is why
3-bit values straddle word boundaries.

Layout (W is ``[out, in]``):
- ``qweight``  int32 ``[in * bits / 32, out]``  codes packed along the input dimension
- ``qzeros``   int32 ``[n_groups, out * bits / 32]``  ``zero - 1`` packed along the output dimension (v1)
- ``scales``   fp16  ``[n_groups, out]``
- ``g_idx``    int32 ``[in]``  group of each input column (a permutation of groups under act-order)
"""
from __future__ import annotations

import torch


def _check(n: int, what: str):
    if n % 32:
        raise ValueError(f"GPTQ packing needs {what} to be a multiple of 32, got {n}.")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[n, m]`` (values < 2**bits) along dim 0 into int32 ``[n*bits/32, m]``."""
    n, m = codes.shape
    _check(n, "the packed dimension")
    c = codes.to(torch.int64).reshape(n // 32, 32, m)
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=codes.device)
    for k in range(32):
        pos = bits * k
        w, off = divmod(pos, 32)
        words[:, w] |= (c[:, k] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the code straddles into the next word
            words[:, w + 1] |= c[:, k] >> (32 - off)
    words = words.reshape(n // 32 * bits, m)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 ``[n*bits/32, m]`` -> int32 codes ``[n, m]``."""
    rows, m = packed.shape
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // bits, bits, m)
    mask = 2**bits - 1
    out = torch.empty(rows // bits, 32, m, dtype=torch.int64, device=packed.device)
    for k in range(32):
        w, off = divmod(bits * k, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        out[:, k] = v & mask
    return out.reshape(rows // bits * 32, m).to(torch.int32)


def pack_gptq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """Pack a quantised weight into the GPTQ tensors.

    ``codes`` ``[out, in]`` integer codes; ``scale``/``zero`` ``[out, n_groups]``; ``g_idx`` ``[in]``.
    Returns ``dict(qweight, qzeros, scales, g_idx)``.
    """
    out_f, in_f = codes.shape
    _check(out_f, "out_features")
    mask = 2**bits - 1
    zeros_v1 = (zero.round().to(torch.int64) - 1) & mask  # v1 stores zero - 1
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),
        "qzeros": pack_rows(zeros_v1.contiguous(), bits).t().contiguous(),
        "scales": scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack_gptq(qweight, qzeros, scales, g_idx, bits: int):
    """Dequantised weight ``[out, in]`` (fp32) from GPTQ tensors (v1 zero points)."""
    q = unpack_rows(qweight, bits).to(torch.float32)  # [in, out]
    zeros = unpack_rows(qzeros.t().contiguous(), bits).t().to(torch.float32) + 1  # [n_groups, out]
    g = g_idx.long()
    w = scales.float()[g] * (q - zeros[g])
    return w.t().contiguous()


# ---- AWQ (GEMM) layout ------------------------------------------------------------------------------
#: AutoAWQ's GEMM kernels read the eight 4-bit codes of a word in this order of output columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_awq_cols(values: torch.Tensor) -> torch.Tensor:
    """4-bit ``values [n, m]`` -> int32 ``[n, m/8]``: eight output columns per word, in ``AWQ_ORDER``."""
    n, m = values.shape
    if m % 8:
        raise ValueError(f"AWQ packing needs out_features to be a multiple of 8, got {m}.")
    v = values.to(torch.int64).reshape(n, m // 8, 8)[..., list(AWQ_ORDER)]
    words = (v << (4 * torch.arange(8, device=v.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    n, w = packed.shape
    nib = (packed.to(torch.int64)[..., None] >> (4 * torch.arange(8, device=packed.device))) & 0xF
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(n, w * 8).to(torch.int32)


def pack_awq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """4-bit ``codes [out, in]``, ``scale/zero [out, n_groups]`` -> the AWQ GEMM tensors
    ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[n_groups, out/8]`` (zeros as they are, no v1
    offset) and ``scales`` fp16 ``[n_groups, out]``."""
    return {"qweight": _pack_awq_cols(codes.t().contiguous()),
            "qzeros": _pack_awq_cols(zero.round().t().contiguous()),
            "scales": scale.t().contiguous().to(torch.float16)}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """Inverse of ``pack_awq``: ``(codes [out, in], scale [out, G], zero [out, G])``."""
    return (_unpack_awq_cols(qweight).t().contiguous(), scales.float().t().contiguous(),
            _unpack_awq_cols(qzeros).t().contiguous().float())
