"""Exporting what QAT learned: keep (bit-exact to ``convert``), refine (GPTQ codes in the learned grid), resolve."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qft.export.pipeline import export, export_config
from qft.quant import QuantScheme


@pytest.fixture(scope="module")
def qat_model():
    """tiny-llama, full fine-tune QAT int4 g64 asymmetric with learned scales, after a few real steps."""
    from qft.models import load_model
    from qft.qat import QATConfig, prepare

    model = load_model("tiny-llama", dtype=torch.float32)
    prepare(model, QATConfig(weight=QuantScheme(bits=4, group_size=64, symmetric=False), range_learning=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 5000, (2, 32), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_export_config_follows_the_learned_grid(qat_model):
    cfg = export_config(qat_model)
    assert (cfg.bits, cfg.group_size, cfg.sym) == (4, 64, False)
    with pytest.raises(ValueError, match="group_size=128 differ from the grid QAT trained"):
        export_config(qat_model, group_size=128)
    assert export_config(qat_model, "resolve", bits=3).bits == 3  # a new grid may differ


def test_keep_writes_the_converted_layers_bit_for_bit(qat_model, tmp_path, tokenizer):
    from qft.export import load_quantized
    from qft.qat import convert

    summary = export(qat_model, tokenizer, None, tmp_path / "keep", export_config(qat_model), progress=False,
                     save_dtype="float32")
    assert summary["learned_layers"] == 4 * 7 and summary["calibration"] is None
    sd = load_file(str(tmp_path / "keep" / "model.safetensors"))
    converted = copy.deepcopy(qat_model)
    convert(converted)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        q = converted.get_submodule(name)
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(sd[f"{name}.{key}"], getattr(q, key)), (name, key)
    x = torch.randint(0, 5000, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "keep", dtype=torch.float32)(x).logits, qat_model(x).logits)
    config = json.loads((tmp_path / "keep" / "config.json").read_text())["quantization_config"]
    assert config["sym"] is False and config["group_size"] == 64 and config["meta"]["method"] == "gptq"


def test_refine_keeps_the_learned_scales_and_lowers_the_error(qat_model, tmp_path, tokenizer, calib_tokens):
    cfg = export_config(qat_model)
    export(qat_model, tokenizer, calib_tokens, tmp_path / "keep", cfg, progress=False)
    s = export(qat_model, tokenizer, calib_tokens, tmp_path / "refine", cfg, progress=False, qat_grid="refine")
    assert s["qat_grid"] == "refine"
    keep = load_file(str(tmp_path / "keep" / "model.safetensors"))
    refine = load_file(str(tmp_path / "refine" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    assert torch.equal(keep[f"{name}.scales"], refine[f"{name}.scales"])
    assert torch.equal(keep[f"{name}.qzeros"], refine[f"{name}.qzeros"])
    assert not torch.equal(keep[f"{name}.qweight"], refine[f"{name}.qweight"])
    rows = {d: json.loads((tmp_path / d / "quant_report.json").read_text()) for d in ("keep", "refine")}
    assert {r["method"] for r in rows["keep"]} == {"qat"} and {r["method"] for r in rows["refine"]} == {"qat+gptq"}
    err = {d: sum(r["rel_output_error"] for r in rs) for d, rs in rows.items()}
    assert err["refine"] < 0.9 * err["keep"]


def test_resolve_solves_a_new_grid(qat_model, tmp_path, tokenizer, calib_tokens):
    s = export(qat_model, tokenizer, calib_tokens, tmp_path / "new", export_config(qat_model, "resolve"),
               progress=False, qat_grid="resolve")
    assert s["learned_layers"] == 0
    rows = json.loads((tmp_path / "new" / "quant_report.json").read_text())
    assert {r["method"] for r in rows} == {"gptq"}


def test_keep_needs_no_calibration_but_a_partial_qat_does(tmp_path, tokenizer):
    from qft.export import CalibrationError
    from qft.models import load_model
    from qft.qat import QATConfig, prepare

    model = load_model("tiny-llama", dtype=torch.float32)
    prepare(model, QATConfig(weight=QuantScheme(bits=4, group_size=64), targets=["mlp.*"]))
    with pytest.raises(CalibrationError, match="layers QAT did not train"):
        export(model, tokenizer, None, tmp_path / "o", export_config(model), progress=False)
    assert not (tmp_path / "o").exists()
