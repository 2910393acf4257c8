"""Scale folding (AWQ, SmoothQuant): exact for every norm convention, checked before rounding.

The Gemma-style tiny model has RMSNorms that scale by ``1 + w``; folding a scale into them as ``w / s``
(what qft did before) changed the model's function by 50-130% per block and wrote a broken model.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qft.export import GPTQConfig
from qft.export.awq import awq_prepass
from qft.export.fold import FoldCheck, fold, norm_offset, smoothing_pairs
from qft.models import load_model
from qft.ptq.calibrate import input_absmax
from qft.ptq.model import decoder_linears
from qft.ptq.smoothquant import smooth

FAMILIES = ["tiny-llama", "tiny-gemma3"]
EVAL = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(7))
AWQ = GPTQConfig(bits=4, group_size=64, method="awq")


def _logits(model):
    with torch.no_grad():
        return model(EVAL).logits.float()


class _Exp(nn.Module):
    """A norm whose output is not affine in its weight: no exact fold exists."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.weight.exp()


def test_the_norm_convention_is_read_off_the_output():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.bias.normal_()
    assert norm_offset(LlamaRMSNorm(64)) == 0.0
    assert norm_offset(Gemma3RMSNorm(64)) == 1.0
    assert norm_offset(ln) == 0.0
    assert norm_offset(_Exp(64)) is None
    torch.testing.assert_close(ln.bias.abs().sum() > 0, torch.tensor(True))  # the probe put the bias back


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(64), lambda: _gemma_norm(64)], ids=["layernorm+bias", "1+w"])
def test_a_fold_leaves_the_norm_and_linear_product_unchanged(make):
    norm, lin = make(), nn.Linear(64, 32)
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = torch.randn(10, 64)
    ref = lin(norm(x))
    s = torch.rand(64) * 3 + 0.2
    fold(norm, [lin], s, norm_offset(norm))
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def _gemma_norm(n):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    return Gemma3RMSNorm(n)


@pytest.mark.parametrize("name", FAMILIES)
def test_awq_folding_without_rounding_leaves_the_logits_unchanged(name, calib_tokens):
    model = load_model(name).eval()
    ref = _logits(model)
    _, rows = awq_prepass(model, AWQ, calib_tokens, progress=False)
    assert [r for r in rows if r["alpha"] is not None], "no scale was folded: nothing tested"
    assert not [r for r in rows if r["fold_refused"]]
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_smoothquant_folding_leaves_the_logits_unchanged(name, calib_tokens):
    model = load_model(name).eval()
    ref = _logits(model)
    lins = decoder_linears(model)
    pairs = smoothing_pairs(model, lins, calib_tokens[:1, :32])
    check = FoldCheck(model, lins, calib_tokens[:1])
    scales = smooth(model, lins, input_absmax(model, calib_tokens, {n[0]: lins[n[0]] for _, n in pairs}), pairs, 0.8,
                    check)
    assert len(scales) == len(pairs) == 12 and check.summary()["folds_refused"] == 0
    assert max(scales.values()) > 2  # the scales are far from 1: a wrong fold would show
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-4)


def test_a_wrong_fold_is_caught_undone_and_reported(calib_tokens, monkeypatch):
    """Folding Gemma's norms as if they computed x̂ ⊙ w (the old bug): every norm pair is refused, the model
    computes what it did, and the AWQ rows name them; the linear -> linear folds are still made."""
    import qft.export.fold as fold_module

    monkeypatch.setattr(fold_module, "norm_offset", lambda norm, atol=1e-3: 0.0)
    model = load_model("tiny-gemma3").eval()
    ref = _logits(model)
    with pytest.warns(UserWarning, match="refused"):
        _, rows = awq_prepass(model, AWQ, calib_tokens, progress=False)
    refused = [r for r in rows if r["fold_refused"]]
    norms = [r for r in rows if r["producer"].endswith("layernorm")]
    assert norms and {r["producer"] for r in refused} >= {r["producer"] for r in norms if r["max_scale"] != 1}
    assert all("moved by" in r["fold_refused"] for r in refused)
    assert any(r["alpha"] is not None for r in rows if r["producer"].endswith("up_proj"))
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-4)


def test_the_awq_export_counts_refused_folds(calib_tokens, tokenizer, tmp_path, monkeypatch):
    import qft.export.fold as fold_module
    from qft.export.pipeline import export

    monkeypatch.setattr(fold_module, "norm_offset", lambda norm, atol=1e-3: 0.0)
    with pytest.warns(UserWarning, match="refused"):
        summary = export(load_model("tiny-gemma3").eval(), tokenizer, calib_tokens, tmp_path / "awq", AWQ,
                         progress=False, measure_drift=False)
    assert summary["folds_refused"] == len(summary["unscaled_layers"]) > 0
    assert all("layernorm" not in n and n.endswith(("_proj",)) for n in summary["unscaled_layers"])


def test_a_check_with_a_fold_that_cannot_be_exact_refuses_it(calib_tokens):
    model = load_model("tiny-llama").eval()
    lins = decoder_linears(model)
    check = FoldCheck(model, lins, calib_tokens[:1])
    before = copy.deepcopy(model.state_dict())
    head = "model.layers.0."
    # gate_proj's rows go through SiLU before down_proj: dividing them is not a fold
    with pytest.warns(UserWarning, match="refused"):
        kept = check.apply(head + "mlp.gate_proj", [head + "mlp.down_proj"], torch.rand(256) + 0.5)
    assert not kept and check.summary()["folds_refused"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
