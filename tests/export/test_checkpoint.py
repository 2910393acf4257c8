"""The HF GPTQ checkpoint: contents, config, exact reload in pure torch, atomic and no-overwrite writes."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import qft.export.checkpoint as ckpt
from qft.export import GPTQConfig, load_quantized, quantize_model, save_quantized
from qft.quant import GPTQLinear, unpack_gptq


@pytest.fixture(scope="module")
def exported(tmp_path_factory, calib_tokens, tokenizer):
    from qft.models import load_model

    model = load_model("tiny-llama", dtype=torch.float32).eval()
    cfg = GPTQConfig(bits=4, group_size=64, desc_act=True)
    q, rows = quantize_model(model, cfg, calib_tokens, batch_size=8, progress=False)
    out = tmp_path_factory.mktemp("ck") / "int4"
    save_quantized(model, q, cfg, out, tokenizer=tokenizer, report_rows=rows)
    return model, q, cfg, out


def test_files_and_quantization_config(exported):
    _, _, cfg, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json", "quant_report.csv",
            "quant_report.json", "quant_report.png"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    import qft

    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64 and qc["desc_act"] is True
    assert qc["sym"] is True and qc["true_sequential"] is True and qc["damp_percent"] == 0.01
    assert qc["format"] == qc["checkpoint_format"] == "gptq" and qc["pack_dtype"] == "int32"
    assert qc["meta"]["quantizer"] == [f"qft:{qft.__version__}"]
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    rows = json.loads((out / "quant_report.json").read_text())
    assert len(rows) == 28 and all(r["rel_output_error"] > 0 for r in rows)
    qkv = [r for r in rows if r["layer"].startswith("model.layers.0.self_attn.") and r["layer"][-6:-5] in "qkv"]
    assert [r["shared_with"] != "" for r in qkv] == [True] * 3
    assert len({r["rel_output_error"] for r in qkv}) == 3  # solved together, reported per layer


def test_tensors_unpack_to_the_solved_weights(exported):
    _, q, _, out = exported
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.2.self_attn.k_proj"
    assert sd[f"{name}.qweight"].dtype == torch.int32 and sd[f"{name}.scales"].dtype == torch.float16
    assert f"{name}.weight" not in sd and "lm_head.weight" not in sd  # tied head saved once
    w = unpack_gptq(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], sd[f"{name}.g_idx"], 4)
    assert torch.allclose(w, q[name].dequantize(), atol=0, rtol=0)


def test_load_quantized_matches_in_memory_model(exported, calib_tokens):
    model, _, _, out = exported
    lq = load_quantized(out, dtype=torch.float32)
    assert isinstance(lq.model.layers[0].mlp.up_proj, GPTQLinear)
    assert lq.lm_head.weight.data_ptr() == lq.model.embed_tokens.weight.data_ptr()
    x = calib_tokens[:2, :32]
    with torch.no_grad():
        a, b = model(x).logits, lq(x).logits
    # same dequantized weights; only the non-quantized tensors went through fp16 on disk
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


def test_refuses_existing_dir_unless_overwrite(exported, tmp_path):
    model, q, cfg, _ = exported
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, q, cfg, out)
    assert (out / "keep.txt").exists()
    save_quantized(model, q, cfg, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_crash_mid_write_leaves_nothing(exported, tmp_path, monkeypatch):
    model, q, cfg, _ = exported

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(model, q, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_3bit_asym_per_channel_roundtrip(tmp_path, calib_tokens):
    from qft.models import load_model

    m = load_model("tiny-llama", dtype=torch.float32).eval()
    ref = copy.deepcopy(m)
    cfg = GPTQConfig(bits=3, group_size=-1, sym=False)
    q, _ = quantize_model(m, cfg, calib_tokens, batch_size=8, progress=False)
    save_quantized(m, q, cfg, tmp_path / "c", dtype=torch.float32)
    lq = load_quantized(tmp_path / "c")
    x = calib_tokens[:1, :16]
    with torch.no_grad():
        assert torch.allclose(m(x).logits, lq(x).logits, atol=1e-4)
        assert not torch.allclose(ref(x).logits, lq(x).logits, atol=1e-4)
