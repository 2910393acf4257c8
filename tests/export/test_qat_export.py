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


def test_refine_keeps_the_learned_scales_and_anchors_general_rows_to_the_base(qat_model, tmp_path, tokenizer,
                                                                             calib_tokens):
    """Refine re-solves the codes inside the learned scales. On task windows its target is the trained
    (learned-grid) model itself, so alone it reproduces ``keep``; with general-text windows anchored to the
    released base (``general_target="base"``) the codes move, and the export's logits on general text come
    closer to the base's than the kept grid's do."""
    from qft.export import load_quantized
    from qft.models import load_model

    cfg = export_config(qat_model)
    general = torch.randint(5000, 9000, (16, 64), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([calib_tokens, general])
    export(qat_model, tokenizer, calib_tokens, tmp_path / "keep", cfg, progress=False, save_dtype="float32")
    export(qat_model, tokenizer, calib_tokens, tmp_path / "alone", cfg, progress=False, qat_grid="refine")
    s = export(qat_model, tokenizer, tokens, tmp_path / "refine", cfg, progress=False, qat_grid="refine",
               base_name="tiny-llama", general_rows=16, general_target="base", save_dtype="float32")
    assert s["qat_grid"] == "refine"
    sd = {d: load_file(str(tmp_path / d / "model.safetensors")) for d in ("keep", "alone", "refine")}
    name = "model.layers.1.mlp.up_proj"
    assert torch.equal(sd["keep"][f"{name}.qweight"], sd["alone"][f"{name}.qweight"])
    for key in ("scales", "qzeros"):
        assert torch.equal(sd["keep"][f"{name}.{key}"], sd["refine"][f"{name}.{key}"])
    assert not torch.equal(sd["keep"][f"{name}.qweight"], sd["refine"][f"{name}.qweight"])
    rows = json.loads((tmp_path / "refine" / "quant_report.json").read_text())
    assert {r["method"] for r in rows} == {"qat+gptq"}
    base = load_model("tiny-llama", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = base(general[:4]).logits
        err = {d: (load_quantized(tmp_path / d, dtype=torch.float32)(general[:4]).logits - ref).square().mean()
               for d in ("keep", "refine")}
    assert err["refine"] < err["keep"]


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


def test_road_defaults_follow_the_general_text():
    from qft.export.pipeline import road

    assert road(None, None, 0, 64) == ("keep", "trained")  # nothing to anchor: the learned grid as is
    assert road(None, None, 32, 64) == ("refine", "base")  # general text: anchored to the base
    assert road("resolve", "trained", 32, 64) == ("resolve", "trained")
    assert road(None, None, 64, 64) == ("keep", "trained")  # no task rows left: nothing to anchor against
    with pytest.raises(ValueError, match=r"general_target='base'\) needs general text"):
        road(None, "base", 0, 64)
    with pytest.raises(ValueError, match="backend='gptqmodel'"):
        road(None, "base", 32, 64, backend="gptqmodel")
    with pytest.raises(ValueError, match="general_target='fp'"):
        road(None, "fp", 32, 64)


def test_callback_refuses_bad_general_arguments_at_init(tmp_path):
    from qft.export import GPTQExportCallback

    with pytest.raises(ValueError, match=r"GPTQExportCallback\(general_target='base'\) needs general text"):
        GPTQExportCallback(tmp_path / "o", general_target="base")
    with pytest.raises(ValueError, match=r"GPTQExportCallback\(general_start=1.5\)"):
        GPTQExportCallback(tmp_path / "o", general_start=1.5)
    cb = GPTQExportCallback(tmp_path / "o", general_calibration=torch.arange(5000), n_samples=8)
    assert (cb.qat_grid, cb.general_target, cb.general_rows) == ("refine", "base", 2)  # a quarter of 8 windows


def test_skip_start_drops_the_head_of_a_file_or_a_tensor(tmp_path):
    from qft.export.calibration import skip_start

    assert torch.equal(skip_start(torch.arange(10), 0.5), torch.arange(5, 10))
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij")
    assert skip_start(f, 0.3) == ["defghij"]
    assert skip_start(f, 0.0) == f
