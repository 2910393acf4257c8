"""The save dtype and the last check before the rename, on a model whose activations pass float16's range.

tiny-gemma3's residual stream reaches 1.1e5 (float16 ends at 65,504), as Gemma 3 270M's does on real text.
Before these checks qft wrote its exports in float16 and the loaders computed in it: every logit nan.
"""
from __future__ import annotations

import pytest
import torch

from qft.export import GPTQConfig, load_quantized
from qft.export.dtype import save_candidates
from qft.export.pipeline import export
from qft.export.verify import ExportCheckError
from qft.models import load_model
from qft.ptq import W8A8Config, load_w8a8
from qft.ptq.export import export_w8a8

EXPORTS = {
    "awq": lambda m, tok, calib, out: export(m, tok, calib, out, GPTQConfig(bits=4, group_size=64, method="awq"),
                                             progress=False, measure_drift=False),
    "smoothquant-w8a8": lambda m, tok, calib, out: export_w8a8(m, tok, calib, out, W8A8Config(
        activation="static", smoothquant=0.8), progress=False),
    "gptq": lambda m, tok, calib, out: export(m, tok, calib, out, GPTQConfig(bits=4, group_size=64), progress=False,
                                              measure_drift=False),
    "rtn": lambda m, tok, calib, out: export(m, tok, None, out, GPTQConfig(bits=4, group_size=64, method="rtn"),
                                             progress=False, measure_drift=False),
}


def _greedy(model, ids, n=8) -> list[int]:
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].float().argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0].tolist()


def _load(name, out, dtype=None):
    return load_w8a8(out, dtype) if name.endswith("w8a8") else load_quantized(out, dtype=dtype)


@pytest.mark.parametrize("name", list(EXPORTS))
def test_an_export_beyond_float16s_range_reloads_finite_and_decodes_as_in_fp32(name, calib_tokens, tokenizer, tmp_path):
    summary = EXPORTS[name](load_model("tiny-gemma3").eval(), tokenizer, calib_tokens, tmp_path / name)
    assert summary["save_dtype"] == "bfloat16"
    if name == "rtn":  # computed in fp32: float16 was tried first and refused (the others calibrate in bf16)
        assert "non-finite" in summary["save_dtypes_refused"]["float16"]
    assert summary["check"]["finite"] and summary["check"]["kl_ratio"] < summary["check"]["limit"]
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    default = _load(name, tmp_path / name)
    assert next(default.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(default(input_ids=prompt).logits).all()
    assert _greedy(default, prompt) == _greedy(_load(name, tmp_path / name, torch.float32), prompt)


def test_an_explicit_float16_that_overflows_is_refused(calib_tokens, tokenizer, tmp_path):
    out = tmp_path / "fp16"
    with pytest.raises(ExportCheckError, match=r"non-finite logits.*model\.(embed_tokens|layers\.0).*save_dtype"):
        export(load_model("tiny-gemma3").eval(), tokenizer, calib_tokens, out, GPTQConfig(bits=4, group_size=64),
               progress=False, measure_drift=False, save_dtype="float16")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no work directory left


def test_a_checkpoint_that_diverges_is_refused_naming_where(calib_tokens, tokenizer, tmp_path, monkeypatch):
    """A packing bug in one layer (its scales off by 50x) is caught by the check, which names the block."""
    import qft.export.checkpoint as checkpoint

    real = checkpoint.packed_layer

    def broken(name, qw, bias, dtype, fmt="gptq"):
        sd = real(name, qw, bias, dtype, fmt)
        if name == "model.layers.2.mlp.down_proj":
            sd[f"{name}.scales"] = sd[f"{name}.scales"] * 50
        return sd

    monkeypatch.setattr(checkpoint, "packed_layer", broken)
    with pytest.raises(ExportCheckError, match=r"first diverge at model\.layers\.2"):
        export(load_model("tiny-llama").eval(), tokenizer, calib_tokens, tmp_path / "q",
               GPTQConfig(bits=4, group_size=64), progress=False, measure_drift=False)
    assert not (tmp_path / "q").exists()


def test_the_loader_runs_an_old_float16_checkpoint_in_bf16(calib_tokens, tmp_path):
    """A file an older qft wrote in float16 for a model beyond its range: the loader sees nan and switches."""
    from qft.export import quantize_model, save_quantized

    model = load_model("tiny-gemma3").eval()
    cfg = GPTQConfig(bits=4, group_size=64, method="rtn")
    quantized, _ = quantize_model(model, cfg, progress=False)
    save_quantized(model, quantized, cfg, tmp_path / "old", dtype=torch.float16, verify=lambda tmp, d: None)
    with pytest.warns(UserWarning, match="not finite in float16"):
        back = load_quantized(tmp_path / "old")
    assert next(back.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(back(input_ids=calib_tokens[:1]).logits).all()
    forced = load_quantized(tmp_path / "old", dtype=torch.float16)  # asked for by name: no switch
    assert next(forced.parameters()).dtype == torch.float16


def test_the_save_dtype_rule():
    from types import SimpleNamespace

    released_bf16 = SimpleNamespace(dtype=torch.bfloat16, _name_or_path="")
    released_fp32 = SimpleNamespace(dtype=torch.float32, _name_or_path="")
    assert save_candidates("auto", released_bf16) == [torch.bfloat16]
    assert save_candidates("auto", released_fp32) == [torch.float16, torch.bfloat16, torch.float32]
    assert save_candidates("auto", released_fp32, compute=torch.bfloat16)[0] == torch.bfloat16
    assert save_candidates("float16", released_bf16) == [torch.float16]
    with pytest.raises(ValueError, match=r"save_dtype='half'.*allowed"):
        save_candidates("half")


def test_a_normal_export_keeps_float16_and_reports_its_check(calib_tokens, tokenizer, tmp_path):
    summary = export(load_model("tiny-llama").eval(), tokenizer, calib_tokens, tmp_path / "q",
                     GPTQConfig(bits=4, group_size=64, method="rtn"), progress=False, measure_drift=False)
    assert summary["save_dtype"] == "float16" and "save_dtypes_refused" not in summary
    assert 0 <= summary["check"]["kl_ratio"] < summary["check"]["limit"]
