"""GGML block formats (what a GGUF file stores): choose each block's grid, then pack the codes.

Tensor math only, no file I/O (``qft.export.gguf`` writes the container with the ``gguf`` package,
which can read these formats but quantizes none of the k-quants). Every weight row is cut into blocks
along its input dimension; a block's values are ``scale * q - offset`` with an unsigned code ``q``:

=======  ======  =====  =========================================================================
format   bits    block  grid
=======  ======  =====  =========================================================================
Q8_0     8       32     fp16 ``d`` per block, ``d * (q - 128)``
Q4_0     4       32     fp16 ``d`` per block, ``d * (q - 8)``
Q5_0     5       32     fp16 ``d`` per block, ``d * (q - 16)``
Q5_1     5       32     fp16 ``d`` and ``m`` per block, ``d * q + m``
Q4_K     4       32     per 256: fp16 ``d``, ``dmin``; per 32: 6-bit ``sc``, ``mn``: ``d*sc*q - dmin*mn``
Q5_K     5       32     as Q4_K with 5-bit codes
Q6_K     6       16     per 256: fp16 ``d``; per 16: int8 ``sc``: ``d * sc * (q - 32)``
=======  ======  =====  =========================================================================

Why a grid search of our own: llama.cpp's reference encoders (without an importance matrix) take
the block's extreme as the scale (Q4_0, Q5_0) or search it against a heuristic weighting (the
k-quants). Here each block's scale (and offset) minimises ``sum_i w_i (x_i - x_hat_i)^2`` over a
set of candidates, each refitted by weighted least squares, with ``w`` the importance of each input
feature: the mean of ``x^2`` over calibration inputs (the Hessian diagonal the export collects), or
uniform without data. The search runs on every block at once (no per-block Python loop).

``BlockGrid.quantized(codes)`` gives the same grid as a ``QuantizedWeight`` (``scale``, ``zero`` per
block), so GPTQ can solve codes inside it (``qft.export.gptq.gptq_solve(grid=...)``); ``pack`` turns
codes plus grid into the bytes llama.cpp reads. ``gguf.quants.dequantize`` of those bytes equals
``QuantizedWeight.dequantize`` (tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .qweight import QuantizedWeight

QK_K = 256


@dataclass(frozen=True)
class BlockFormat:
    name: str
    bits: int
    block: int  # weights sharing one scale (and offset)
    super_block: int  # weights per stored ggml block
    nbytes: int  # bytes per stored ggml block
    asymmetric: bool  # an offset per block (Q5_1, Q4_K, Q5_K)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero(self) -> int:
        """The code of 0 in the symmetric formats."""
        return 2 ** (self.bits - 1)

    def fits(self, in_features: int) -> bool:
        return in_features % self.super_block == 0


FORMATS = {f.name: f for f in (
    BlockFormat("Q8_0", 8, 32, 32, 34, False),
    BlockFormat("Q4_0", 4, 32, 32, 18, False),
    BlockFormat("Q5_0", 5, 32, 32, 22, False),
    BlockFormat("Q5_1", 5, 32, 32, 24, True),
    BlockFormat("Q4_K", 4, 32, QK_K, 144, True),
    BlockFormat("Q5_K", 5, 32, QK_K, 176, True),
    BlockFormat("Q6_K", 6, 16, QK_K, 210, False),
)}


@dataclass
class BlockGrid:
    """One tensor's stored grid: what the file holds besides the codes.

    ``d`` is per block (Q*_0, Q5_1) or per super-block (k-quants); ``sc`` the integer sub-block scales
    of the k-quants; ``dmin`` and ``mn`` the offsets (``dmin`` per block for Q5_1, where it is ``-m``).
    """

    fmt: BlockFormat
    d: torch.Tensor  # fp32 holding fp16 values
    sc: torch.Tensor | None = None  # int64 [rows, n_blocks]
    dmin: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def _per_block(self, t: torch.Tensor) -> torch.Tensor:
        per = self.fmt.super_block // self.fmt.block
        return t.repeat_interleave(per, dim=1) if per > 1 else t

    def scale(self) -> torch.Tensor:
        """Per block, ``[rows, n_blocks]``: the step between codes."""
        d = self._per_block(self.d)
        return d * self.sc.float() if self.sc is not None else d

    def offset(self) -> torch.Tensor:
        """Per block: ``value = scale * q - offset``."""
        if not self.fmt.asymmetric:
            return self.scale() * self.fmt.zero
        dmin = self._per_block(self.dmin)
        return dmin * self.mn.float() if self.mn is not None else dmin

    def zero(self) -> torch.Tensor:
        if not self.fmt.asymmetric:
            return torch.full_like(self.scale(), float(self.fmt.zero))
        return self.offset() / self.scale()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes of weights ``x [rows, in]`` on this grid."""
        rows, cols = x.shape
        xb = x.float().reshape(rows, -1, self.fmt.block)
        s, o = self.scale().unsqueeze(-1), self.offset().unsqueeze(-1)
        return torch.round((xb + o) / s).clamp_(0, self.fmt.maxq).reshape(rows, cols).to(torch.int32)

    def quantized(self, codes: torch.Tensor) -> QuantizedWeight:
        """This grid and ``codes`` as a ``QuantizedWeight`` (group size = the format's block)."""
        cols = codes.shape[1]
        g_idx = (torch.arange(cols, device=codes.device) // self.fmt.block).to(torch.int32)
        return QuantizedWeight(codes.to(torch.int32), self.scale(), self.zero(), g_idx, self.fmt.bits, self.fmt.block)

    def cpu(self) -> "BlockGrid":
        def move(t):
            return None if t is None else t.cpu()

        return BlockGrid(self.fmt, move(self.d), move(self.sc), move(self.dmin), move(self.mn))


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


# --------------------------------------------------------------------------------------------- search
_STEPS = torch.linspace(-1.0, 1.0, 21)  # candidate offsets of the code range, as in llama.cpp's searches


def _symmetric_scales(x: torch.Tensor, w: torch.Tensor, z: int) -> torch.Tensor:
    """Per block of ``x [n, B]``: the scale ``d`` of ``d * k`` (``k`` in ``[-z, z-1]``) with the least
    weighted error, among candidates that put the block's extreme at ``-(z + t)``, each refitted by
    least squares for its own codes."""
    idx = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, idx)  # the signed extreme: it goes to the side with one more code
    d = mx.unsqueeze(0) / -(z + _STEPS.to(x.device).view(-1, 1, 1))  # [C, n, 1]
    d = torch.where(d == 0, torch.ones_like(d), d)
    k = torch.round(x / d).clamp_(-z, z - 1)
    wk = w * k
    sxk, skk = (wk * x).sum(-1), (wk * k).sum(-1)  # [C, n]
    best = torch.where(skk > 0, sxk.square() / skk.clamp_min(1e-30), torch.zeros_like(sxk)).argmax(0)  # max gain
    dl = torch.where(skk > 0, sxk / skk.clamp_min(1e-30), d.squeeze(-1))
    return dl.gather(0, best.unsqueeze(0)).squeeze(0)  # [n]


def _affine_scales(x: torch.Tensor, w: torch.Tensor, nmax: int, nonpositive_min: bool):
    """Per block of ``x [n, B]``: ``(s, m)`` of ``s * q + m`` (``q`` in ``[0, nmax]``, ``s >= 0``) with the
    least weighted error, among candidate code ranges refitted by weighted least squares."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    if nonpositive_min:
        lo = lo.clamp(max=0)
    span = (hi - lo).clamp_min(1e-12)
    inv = (nmax + _STEPS.to(x.device).view(-1, 1, 1)) / span  # [C, n, 1]
    q = torch.round(inv * (x - lo)).clamp_(0, nmax)
    sw, sx = w.sum(-1), (w * x).sum(-1)  # [n]
    wq = w * q
    sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)  # [C, n]
    det = sw * sqq - sq * sq
    ok = det > 1e-20
    s = torch.where(ok, (sw * sqx - sq * sx) / det.clamp_min(1e-20), 1 / inv.squeeze(-1))
    m = torch.where(ok, (sqq * sx - sq * sqx) / det.clamp_min(1e-20), lo.squeeze(-1).expand_as(s))
    if nonpositive_min:  # the k-quants store -m >= 0: refit s alone where the optimum wants m > 0
        pos = m > 0
        m = torch.where(pos, torch.zeros_like(m), m)
        s = torch.where(pos, sqx / sqq.clamp_min(1e-30), s)
    s = s.clamp_min(0)
    err = (w * (x - s.unsqueeze(-1) * q - m.unsqueeze(-1)).square()).sum(-1)
    best = err.argmin(0, keepdim=True)
    return s.gather(0, best).squeeze(0), m.gather(0, best).squeeze(0)


def _super(t: torch.Tensor, per: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, per)


def _six_bit(v: torch.Tensor, per: int):
    """Non-negative per-block values as ``d * c`` with a fp16 ``d`` per super-block and 6-bit ``c``."""
    vs = _super(v, per)
    d = fp16(vs.amax(-1) / 63)
    c = torch.where(d.unsqueeze(-1) > 0, torch.round(vs / d.unsqueeze(-1).clamp_min(1e-30)), torch.zeros_like(vs))
    return d, c.clamp_(0, 63).reshape(v.shape).long()


def choose_grid(x: torch.Tensor, fmt: BlockFormat | str, importance: torch.Tensor | None = None) -> BlockGrid:
    """The grid of weight ``x [rows, in]`` in ``fmt``, weighting input feature ``j``'s error by
    ``importance[j]`` (uniform when None). ``in`` must be a multiple of the format's super-block."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    rows, cols = x.shape
    if cols % fmt.super_block:
        raise ValueError(f"choose_grid(fmt={fmt.name!r}): rows of {cols} inputs are not a multiple of its "
                         f"{fmt.super_block}-weight blocks.")
    imp = torch.ones(cols, device=x.device) if importance is None else importance.to(x.device, torch.float32)
    imp = imp.clamp_min(imp.mean() * 1e-6 + 1e-30)  # inputs never seen still count a little
    out = []
    step = max(1, (1 << 22) // (cols * len(_STEPS)))  # rows per chunk: bounds the candidate tensors
    for r in range(0, rows, step):
        out.append(_choose_rows(x[r:r + step].float(), fmt, imp))
    first = out[0]

    def cat(name):
        return None if getattr(first, name) is None else torch.cat([getattr(g, name) for g in out])

    return BlockGrid(fmt, cat("d"), cat("sc"), cat("dmin"), cat("mn"))


def _choose_rows(x: torch.Tensor, fmt: BlockFormat, imp: torch.Tensor) -> BlockGrid:
    rows, cols = x.shape
    nb = cols // fmt.block
    xb = x.reshape(rows * nb, fmt.block)
    wb = imp.view(1, nb, fmt.block).expand(rows, nb, fmt.block).reshape(rows * nb, fmt.block)
    per = fmt.super_block // fmt.block
    if fmt.name in ("Q8_0", "Q4_0", "Q5_0"):
        return BlockGrid(fmt, fp16(_symmetric_scales(xb, wb, fmt.zero)).view(rows, nb))
    if fmt.name == "Q6_K":
        s = _symmetric_scales(xb, wb, fmt.zero).view(rows, nb)
        ss = _super(s, per)
        big = ss.gather(-1, ss.abs().argmax(-1, keepdim=True))  # the signed largest scale goes to -128
        d = fp16(-big.squeeze(-1) / 128)
        dd = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
        sc = torch.round(ss / dd).clamp_(-128, 127)
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)  # a zero scale would make its codes undefined
        return BlockGrid(fmt, d, sc.reshape(rows, nb).long())
    s, m = _affine_scales(xb, wb, fmt.maxq, nonpositive_min=fmt.name != "Q5_1")
    s, m = s.view(rows, nb), m.view(rows, nb)
    if fmt.name == "Q5_1":
        d = fp16(s)
        d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
        return BlockGrid(fmt, d, None, fp16(-m))
    d, sc = _six_bit(s, per)
    sc = sc.clamp_(min=1)
    d = torch.where(d == 0, torch.full_like(d, 2.0**-24), d)
    dmin, mn = _six_bit(-m, per)
    return BlockGrid(fmt, d, sc, dmin, mn)


def quantize(x: torch.Tensor, fmt: BlockFormat | str, importance: torch.Tensor | None = None):
    """Round-to-nearest on the chosen grid: ``(codes, grid)``."""
    grid = choose_grid(x, fmt, importance)
    return grid.codes(x), grid


# -------------------------------------------------------------------------------------------- packing
def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 values ``[..., n]`` as little-endian bytes ``[..., 2n]``."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


def _u32_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).to(torch.int32).contiguous().view(torch.uint8)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo & 15) | ((hi & 15) << 4)).to(torch.uint8)


def _high_bits32(q: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit ``bit`` of each of 32 codes ``[..., 32]`` as one little-endian uint32 ``[..., 4]`` bytes."""
    h = ((q >> bit) & 1) << torch.arange(32, device=q.device)
    return _u32_bytes(h.sum(-1, keepdim=True))


def pack(codes: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """The bytes of ``codes [rows, in]`` (unsigned, on ``grid``) as ggml stores them: uint8 ``[rows, bytes]``."""
    fmt = grid.fmt
    rows, cols = codes.shape
    n = cols // fmt.super_block
    q = codes.to(torch.int64).reshape(rows, n, fmt.super_block)
    if fmt.name == "Q8_0":
        parts = [_f16_bytes(grid.d.unsqueeze(-1)), (q - 128).to(torch.int8).view(torch.uint8)]
    elif fmt.name == "Q4_0":
        parts = [_f16_bytes(grid.d.unsqueeze(-1)), _nibbles(q[..., :16], q[..., 16:])]
    elif fmt.name == "Q5_0":
        parts = [_f16_bytes(grid.d.unsqueeze(-1)), _high_bits32(q, 4), _nibbles(q[..., :16], q[..., 16:])]
    elif fmt.name == "Q5_1":
        parts = [_f16_bytes(grid.d.unsqueeze(-1)), _f16_bytes(-grid.dmin.unsqueeze(-1)), _high_bits32(q, 4),
                 _nibbles(q[..., :16], q[..., 16:])]
    elif fmt.name in ("Q4_K", "Q5_K"):
        parts = [_f16_bytes(grid.d.unsqueeze(-1)), _f16_bytes(grid.dmin.unsqueeze(-1)),
                 _k_scales(grid.sc.reshape(rows, n, 8), grid.mn.reshape(rows, n, 8))]
        pairs = q.reshape(rows, n, 4, 2, 32)  # 64-weight chunks: sub-blocks 2c (low nibble), 2c+1 (high)
        if fmt.name == "Q5_K":
            hb = (pairs >> 4) & 1  # bit 2c / 2c+1 of byte l: the fifth bit of weight l of those sub-blocks
            shift = torch.arange(8, device=q.device).view(4, 2, 1)
            parts.append((hb << shift).sum((2, 3)).to(torch.uint8))
        parts.append(_nibbles(pairs[..., 0, :], pairs[..., 1, :]).reshape(rows, n, 128))
    elif fmt.name == "Q6_K":
        h = q.reshape(rows, n, 2, 4, 32)  # halves of 128: quarters l, l+32, l+64, l+96
        ql = torch.cat([_nibbles(h[:, :, :, 0], h[:, :, :, 2]), _nibbles(h[:, :, :, 1], h[:, :, :, 3])], -1)
        shift = torch.tensor([0, 2, 4, 6], device=q.device).view(4, 1)
        qh = ((h >> 4) << shift).sum(3).to(torch.uint8)
        parts = [ql.reshape(rows, n, 128), qh.reshape(rows, n, 64),
                 grid.sc.reshape(rows, n, 16).to(torch.int8).view(torch.uint8), _f16_bytes(grid.d.unsqueeze(-1))]
    else:
        raise ValueError(f"pack: no packer for {fmt.name!r}; known: {sorted(FORMATS)}.")
    return torch.cat([p.reshape(rows, n, -1) for p in parts], -1).reshape(rows, n * fmt.nbytes)


def _k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per super-block in the 12 bytes of Q4_K/Q5_K: the low six bits of
    the first four each in a byte, the last four split into a nibble and two spare top bits."""
    a, b = sc[..., :4], sc[..., 4:]
    ma, mb = mn[..., :4], mn[..., 4:]
    return torch.cat([a | ((b >> 4) << 6), ma | ((mb >> 4) << 6), (b & 15) | ((mb & 15) << 4)], -1).to(torch.uint8)
