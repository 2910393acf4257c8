"""transformers + gptqmodel load a qft checkpoint and agree with qft.load_quantized.

Needs the ``interop`` extra (gptqmodel, optimum; torch>=2.14.1), which the default venv lacks; ``make interop``
builds ``.venv-interop`` and runs these tests there.
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


def test_qat_learned_grid_loads_in_transformers_gptqmodel(tmp_path, tokenizer):
    """Quantization-aware QLoRA (NF4 + LoRA, QAT on the merged weight) exported on its learned grid: the
    checkpoint runs in transformers + gptqmodel and computes what the fake-quant model computed."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    from qft.export.pipeline import export, export_config
    from qft.module import CausalLMModule
    from qft.qat import QATConfig, prepare
    from qft.quant import QuantScheme

    module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32", lora_r=4)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    for n, p in module.model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    prepare(module.model, QATConfig(weight=QuantScheme(bits=4, group_size=64)))
    model = module.model.eval()
    summary = export(model, tokenizer, None, tmp_path / "ck", export_config(model), base_name="tiny-llama",
                     progress=False)
    assert summary["qat_grid"] == "keep" and summary["learned_layers"] == 4 * 7

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"), device_map="cpu", dtype=torch.bfloat16)
    assert "gptqmodel" in type(hf.model.layers[0].self_attn.q_proj).__module__
    x = torch.randint(0, 5000, (2, 32), generator=g)
    with torch.no_grad():
        a, b = hf(x).logits.float(), model(input_ids=x).logits.float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max() + 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_transformers_loads_qft_awq_through_gptqmodel(tmp_path, calib_tokens, tokenizer):
    """``method="awq"`` writes an AWQ GEMM checkpoint (``quant_method "awq"``, zero points): transformers runs
    it with gptqmodel's AWQ kernels, and its logits are qft's own reading of the file."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    from qft.export import GPTQConfig, load_quantized, quantize_model, save_quantized
    from qft.models import load_model

    model = load_model("tiny-llama", dtype=torch.float32).eval()
    cfg = GPTQConfig(bits=4, group_size=64, sym=False, method="awq")
    q, _ = quantize_model(model, cfg, calib_tokens, batch_size=8, progress=False)
    save_quantized(model, q, cfg, tmp_path / "awq", tokenizer=tokenizer, dtype=torch.float16)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "awq"), device_map="cpu", dtype=torch.float16)
    layer = hf.model.layers[0].self_attn.q_proj
    assert "gptqmodel" in type(layer).__module__ and "Awq" in type(layer).__name__
    ours = load_quantized(tmp_path / "awq", dtype=torch.float32)
    x = calib_tokens[:2, :32]
    with torch.no_grad():
        a, b = hf(x).logits.float(), ours(x).logits.float()
    assert float((a - b).norm() / b.norm()) < 5e-3  # fp16 kernels against fp32 (measured 1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
