"""transformers + gptqmodel load a qft checkpoint and agree with qft.load_quantized.

Needs the ``interop`` extra (gptqmodel, optimum; torch>=2.14.1), which the default venv lacks; run it from
an interop venv: ``/work/venv-interop/bin/python -m pytest tests/export/test_interop.py``.
"""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="needs the interop extra (gptqmodel + optimum, torch>=2.14.1): pip install 'qft[interop]'")


def test_transformers_gptqmodel_logits_match_load_quantized(tmp_path, calib_tokens, tokenizer):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    from qft.export import GPTQConfig, load_quantized, quantize_model, save_quantized
    from qft.models import load_model

    model = load_model("tiny-llama", dtype=torch.bfloat16).eval()
    cfg = GPTQConfig(bits=4, group_size=64)  # gptqmodel's CPU kernels need group | in_features
    q, rows = quantize_model(model, cfg, calib_tokens, batch_size=8, progress=False)
    save_quantized(model, q, cfg, tmp_path / "ck", tokenizer=tokenizer)

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"), device_map="cpu", dtype=torch.bfloat16)
    assert "gptqmodel" in type(hf.model.layers[0].self_attn.q_proj).__module__
    ours = load_quantized(tmp_path / "ck", dtype=torch.bfloat16)
    x = calib_tokens[:2, :32]
    with torch.no_grad():
        a, b = hf(x).logits.float(), ours(x).logits.float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max() + 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_backend_gptqmodel_writes_a_checkpoint_load_quantized_reads(tmp_path, calib_tokens, tokenizer):
    """``backend="gptqmodel"`` hands the solve to GPTQModel with qft's grid settings; the result is a
    checkpoint qft's own loader runs, close to the qft-solved one."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from qft.export import GPTQConfig, load_quantized
    from qft.export.pipeline import export
    from qft.models import load_model

    model = load_model("tiny-llama", dtype=torch.float32).eval()
    cfg = GPTQConfig(bits=4, group_size=64)
    outs = {}
    for backend in ("qft", "gptqmodel"):
        summary = export(model, tokenizer, calib_tokens, tmp_path / backend, cfg, backend=backend, dtype="bfloat16",
                         measure_drift=False, progress=False)
        assert summary["backend"] == backend and (tmp_path / backend / "config.json").exists()
        x = calib_tokens[:2, :32]
        with torch.no_grad():
            outs[backend] = load_quantized(tmp_path / backend, dtype=torch.float32)(x).logits
    cos = torch.nn.functional.cosine_similarity(outs["qft"].flatten(), outs["gptqmodel"].flatten(), dim=0)
    assert cos > 0.95
