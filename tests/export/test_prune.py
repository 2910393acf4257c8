"""Pruning as an export step: the masks (magnitude, Wanda, SparseGPT in the solve), the patterns, joint
SparseGPT + int4, the checkpoint that keeps its zeros, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch

from qft.export import GPTQConfig, load_quantized, quantize_model, save_quantized
from qft.export.gptq import gptq_solve
from qft.export.prune import PrunedWeight, magnitude_mask, wanda_mask

G = torch.Generator().manual_seed(0)
W = torch.randn(64, 128, generator=G)
X = torch.randn(1024, 128, generator=G)
X[:, :8] *= 10  # a few loud input channels: Wanda and SparseGPT must keep their weights
H = 2 * X.t() @ X / len(X)


def _err(Wp):
    D = W - Wp
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_have_the_asked_sparsity_and_pattern(pattern):
    for mask in (magnitude_mask(W, 0.5, pattern), wanda_mask(W, torch.diag(H), 0.5, pattern)):
        assert mask.float().mean() == 0.5
        if pattern == "2:4":
            assert torch.all(mask.reshape(64, 32, 4).sum(-1) == 2)
    wanda = wanda_mask(W, torch.diag(H), 0.5)
    assert torch.all(wanda.sum(1) == 64)  # Wanda compares within each output row
    assert wanda[:, :8].float().mean() < 0.1  # the loud channels' weights survive


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_the_output(pattern):
    cfg = GPTQConfig(method="none", sparsity=0.5, sparsity_pattern=pattern, block_size=32)
    pw = gptq_solve(W, H, cfg)
    assert isinstance(pw, PrunedWeight)
    zero = pw.weight == 0
    assert zero.float().mean() == pytest.approx(0.5, abs=0.01)
    if pattern == "2:4":
        assert torch.all(zero.reshape(64, 32, 4).sum(-1) == 2)
    errs = {"sparsegpt": _err(pw.weight), "wanda": _err(W.masked_fill(wanda_mask(W, torch.diag(H), 0.5, pattern), 0)),
            "magnitude": _err(W.masked_fill(magnitude_mask(W, 0.5, pattern), 0))}
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs


def test_joint_sparsegpt_and_int4_keeps_exact_zeros():
    cfg = GPTQConfig(bits=4, group_size=64, sym=False, sparsity=0.5, sparsity_pattern="2:4")
    qw = gptq_solve(W, H, cfg)
    deq = qw.dequantize()
    assert torch.all((deq == 0).reshape(64, 32, 4).sum(-1) >= 2)  # rounding may zero more, never fewer
    dense = gptq_solve(W, H, GPTQConfig(bits=4, group_size=64, sym=False))
    assert _err(dense.dequantize()) < _err(deq) < _err(W.masked_fill(magnitude_mask(W, 0.5, "2:4"), 0))


@pytest.mark.parametrize("method,prune", [("none", "sparsegpt"), ("none", "wanda"), ("none", "magnitude"),
                                          ("gptq", "sparsegpt"), ("rtn", "magnitude")])
def test_the_export_writes_its_zeros_and_records_them(tiny, calib_tokens, tmp_path, tokenizer, method, prune):
    cfg = GPTQConfig(bits=4, group_size=64, method=method, sparsity=0.5, prune_method=prune)
    q, rows = quantize_model(tiny, cfg, calib_tokens, batch_size=8, progress=False)
    assert len(rows) == 28 and all(r["sparsity"] >= 0.49 for r in rows)
    x = calib_tokens[:2, :32]
    with torch.no_grad():
        ref = tiny(x).logits
    out = save_quantized(tiny, q, cfg, tmp_path / "p", tokenizer=tokenizer, dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    sc = config["sparsity_config"]
    assert (sc["method"], sc["sparsity_structure"], sc["target_sparsity"]) == (prune, "unstructured", 0.5)
    assert sc["measured_sparsity"] >= 0.5
    assert ("quantization_config" in config) == (method != "none")
    back = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, rtol=1e-4, atol=1e-4)
    w = back.model.layers[1].mlp.down_proj
    dense = w.weight if method == "none" else w.dequantized_weight()
    assert float((dense == 0).float().mean()) >= 0.49


def test_pruning_refusals():
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        GPTQConfig(sparsity=0.6, sparsity_pattern="2:4")
    with pytest.raises(ValueError, match="only prunes"):
        GPTQConfig(method="none")
    with pytest.raises(ValueError, match="only magnitude"):
        GPTQConfig(method="rtn", sparsity=0.5, prune_method="wanda")
    with pytest.raises(ValueError, match="AWQ and pruning"):
        GPTQConfig(method="awq", sparsity=0.5)
    with pytest.raises(ValueError, match="natural order"):
        GPTQConfig(sparsity=0.5, sparsity_pattern="2:4", act_group_aware=True)
