"""AWQ: the scale search and clipping (tensor math), the fold (exact in full precision), the AWQ GEMM
checkpoint (packed, read back), AWQ then GPTQ, and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from qft.export import GPTQConfig, load_quantized, quantize_model, save_quantized
from qft.export.awq import awq_prepass, output_error, search_clip, search_scale
from qft.export.gptq import rtn_solve
from qft.quant.pack import pack_awq, unpack_awq

CFG = GPTQConfig(bits=4, group_size=64, sym=False, method="awq")
EVAL = torch.randint(0, 5000, (2, 40), generator=torch.Generator().manual_seed(5))


def _logits(model, x=EVAL):
    with torch.no_grad():
        return model(x).logits.float()


def _salient_layer():
    """A weight and inputs where two input channels carry 30x the activation of the rest."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 128, generator=g)
    X = torch.randn(2048, 128, generator=g)
    X[:, [5, 77]] *= 30
    return W, X.t() @ X / len(X), X.abs().mean(0)


def test_scaling_the_salient_channels_cuts_the_output_error():
    W, H, x_mean = _salient_layer()
    s, a, ratio = search_scale(W, H, x_mean, CFG)
    assert a > 0 and ratio < 0.8, (a, ratio)  # measured about 0.55 on this layer
    assert s[[5, 77]].min() > s.median() * 2  # the loud channels get the finer grid
    rtn_err = output_error(W - rtn_solve(W, CFG).dequantize(), H)
    awq_err = output_error(W - rtn_solve(W * s, CFG).dequantize() / s, H)
    torch.testing.assert_close(awq_err / rtn_err, torch.tensor(ratio), rtol=1e-4, atol=0)


def test_clipping_never_raises_a_groups_output_error():
    W, H, _ = _salient_layer()
    W[3, 10] = 8.0  # one outlier weight stretches its group's range
    clipped = search_clip(W, H, CFG)
    assert clipped[3, 10] < 8.0
    def group_errors(Wc):
        D = (W - rtn_solve(Wc, CFG).dequantize()).reshape(96, 2, 64)
        Hb = torch.stack([H[:64, :64], H[64:, 64:]])
        return torch.einsum("ogi,gij,ogj->og", D, Hb, D)
    assert torch.all(group_errors(clipped) <= group_errors(W) * (1 + 1e-5))
    assert group_errors(clipped).sum() < group_errors(W).sum()


def test_pack_awq_round_trips():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.int32)
    scale = torch.rand(64, 2, generator=g).half().float()
    zero = torch.randint(0, 16, (64, 2), generator=g).float()
    packed = pack_awq(codes, scale, zero)
    assert packed["qweight"].shape == (128, 8) and packed["qzeros"].shape == (2, 8)
    back = unpack_awq(**packed)
    assert all(torch.equal(a, b) for a, b in zip(back, (codes, scale, zero)))
    # AutoAWQ's word order: the first word of row 0 holds output columns 0, 2, 4, 6, 1, 3, 5, 7
    word = int(packed["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(codes[c, 0]) for c in (0, 2, 4, 6, 1, 3, 5, 7)]


def test_the_fold_keeps_the_full_precision_model(calib_tokens):
    from qft.models import load_model

    model = load_model("tiny-llama", dtype=torch.float32).eval()
    ref = _logits(model)
    norm = model.model.layers[1].input_layernorm.weight.detach().clone()
    grids, rows = awq_prepass(model, GPTQConfig(bits=4, group_size=64, sym=False, method="awq_gptq"), calib_tokens,
                              progress=False)
    assert grids == {}  # awq_gptq only scales; GPTQ solves afterwards
    producers = {r["producer"].split(".", 3)[-1] for r in rows}
    assert producers == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # o_proj: GQA shapes differ
    assert not torch.equal(model.model.layers[1].input_layernorm.weight, norm)  # something was folded
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)


def test_awq_writes_an_awq_checkpoint_that_reads_back(tiny, calib_tokens, tmp_path, tokenizer):
    ref = _logits(tiny)
    q, rows = quantize_model(tiny, CFG, calib_tokens, batch_size=8, progress=False)
    assert {r["method"] for r in rows} == {"awq"} and len(q) == 28
    assert all("awq_alpha" in r for r in rows if not r["layer"].endswith("o_proj"))
    got = _logits(tiny)
    assert float((got - ref).norm() / ref.norm()) < 0.3
    out = save_quantized(tiny, q, CFG, tmp_path / "awq", tokenizer=tokenizer, dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["zero_point"], qc["bits"], qc["group_size"]) == \
        ("awq", "gemm", True, 4, 64)
    back = load_quantized(out, dtype=torch.float32)
    assert torch.equal(_logits(back), got)


def test_awq_then_gptq_is_a_gptq_checkpoint(calib_tokens, tmp_path, tokenizer):
    from qft.models import load_model

    errs = {}
    for method in ("rtn", "awq_gptq"):
        model = load_model("tiny-llama", dtype=torch.float32).eval()
        ref = _logits(model, calib_tokens[:4])
        cfg = GPTQConfig(bits=4, group_size=64, sym=False, method=method)
        q, rows = quantize_model(model, cfg, calib_tokens, batch_size=8, progress=False)
        errs[method] = float((_logits(model, calib_tokens[:4]) - ref).norm() / ref.norm())
    assert errs["awq_gptq"] < errs["rtn"], errs
    save_quantized(model, q, cfg, tmp_path / "g", tokenizer=tokenizer)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_awq_refusals(tmp_path, calib_tokens):
    from qft.export.layerwise import export_layerwise
    from qft.export.pipeline import export, export_config
    from qft.models import load_model, local_dir
    from qft.qat import QATConfig, prepare
    from qft.quant import QuantScheme

    with pytest.raises(ValueError, match="AWQ .*4-bit"):
        GPTQConfig(bits=3, method="awq")
    with pytest.raises(ValueError, match="whole model in memory"):
        export_layerwise(local_dir("tiny-llama"), tmp_path / "x", CFG, calib_tokens)
    model = load_model("tiny-llama", dtype=torch.float32)
    prepare(model, QATConfig(weight=QuantScheme(bits=4, group_size=64)))
    with pytest.raises(ValueError, match="cannot write the grid QAT learned"):
        export(model, None, calib_tokens, tmp_path / "y", export_config(model, method="awq"), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="calibration tokens"):
        quantize_model(copy.deepcopy(load_model("tiny-llama", dtype=torch.float32)), CFG, None, progress=False)
