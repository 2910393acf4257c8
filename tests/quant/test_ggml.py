"""GGML block formats: the bytes qft packs read back through gguf-py's own dequantizer as qft's grid
says, the weighted search beats gguf-py's reference rounding, and importance moves the error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qft.quant.ggml import FORMATS, choose_grid, pack, quantize  # noqa: E402


def _weight(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.04
    w[3, 7], w[10, 300] = 0.8, -0.6  # outliers: a block's scale must not lose them
    w[5, :32] = 0  # an all-zero block
    return w


def _err(w, w_hat, imp):
    return float(((w - w_hat).square() * imp).sum() / (w.square() * imp).sum())


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_packed_bytes_dequantize_in_gguf_to_qft_grid(name):
    w = _weight()
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.05
    codes, grid = quantize(w, name, imp)
    assert int(codes.min()) >= 0 and int(codes.max()) <= FORMATS[name].maxq
    data = pack(codes, grid).numpy()
    assert data.shape == (48, 512 // FORMATS[name].super_block * FORMATS[name].nbytes)
    theirs = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name))
    ours = grid.quantized(codes).dequantize().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-7)
    assert _err(w, torch.from_numpy(theirs), imp) < {8: 1e-4, 6: 1e-3, 5: 4e-3, 4: 1.5e-2}[FORMATS[name].bits]
    assert torch.equal(torch.from_numpy(theirs[5, :32]), torch.zeros(32))  # zeros stay exact


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_search_beats_gguf_reference_rounding(name):
    """gguf-py's quantizers are llama.cpp's reference (extreme-based) rounding; qft's search of the
    block scale must have a lower error on the same weights (uniform importance)."""
    w = _weight(rows=256, seed=3)
    ones = torch.ones(512)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
    codes, grid = quantize(w, name)
    ours = grid.quantized(codes).dequantize()
    assert _err(w, ours, ones) < 0.97 * _err(w, ref, ones)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_importance_lowers_the_error_where_it_is_high(name):
    w = _weight(rows=128, seed=4)
    imp = torch.ones(512)
    imp[::7] = 50.0  # every 7th input feature carries most of the activation energy
    flat = quantize(w, name)
    weighted = quantize(w, name, imp)
    e_flat = _err(w, flat[1].quantized(flat[0]).dequantize(), imp)
    e_weighted = _err(w, weighted[1].quantized(weighted[0]).dequantize(), imp)
    assert e_weighted < 0.95 * e_flat


def test_rows_that_do_not_fill_a_super_block_are_refused():
    with pytest.raises(ValueError, match="not a multiple of its 256-weight blocks"):
        choose_grid(torch.randn(4, 576), "Q4_K")
