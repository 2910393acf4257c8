"""The whole post-fit export in one function, shared by ``GPTQExportCallback`` and ``qft export``.

trained (NF4/bf16 + LoRA) --merge--> fp32 base + deltas --GPTQ/RTN--> packed int weights --> HF checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .blocks import check_model
from .checkpoint import check_output_dir, save_quantized, _swap_into_place
from .config import GPTQConfig
from .merge import drift, lora_deltas, merge_adapters
from .sequential import quantize_model

BACKENDS = ("qft", "gptqmodel")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gptqmodel_available() -> bool:
    try:
        import gptqmodel  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed: {list(BACKENDS)}.")
    if backend == "gptqmodel" and not gptqmodel_available():
        raise ImportError("backend='gptqmodel' needs GPTQModel: pip install 'qft[interop]' (torch>=2.14.1), or use "
                          "backend='qft' (pure torch, no extra dependency).")


def resolve_dtype(name: str, device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown; allowed: {list(DTYPES)}.")
    if DTYPES[name] is not None:
        return DTYPES[name]
    from qft.module import bf16_supported

    return torch.bfloat16 if bf16_supported(device) else torch.float32


def is_adapted(model) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merged_model(trained, base_name: str | None, merge_into: str, masks=None):
    """The fp32 model to quantize: adapters merged into the base, or a plain copy of a non-adapted model."""
    if is_adapted(trained):
        if base_name is None:
            raise ValueError("export: the trained model has adapters, so the original base is needed; pass the base "
                             "model name (e.g. model='smollm2-135m').")
        return merge_adapters(trained, base_name, merge_into=merge_into, masks=masks)
    return copy.deepcopy(trained).float().cpu().eval()


def export(trained, tokenizer, tokens: torch.Tensor, output_dir, cfg: GPTQConfig, base_name: str | None = None,
           merge_into: str = "original", masks=None, backend: str = "qft", device=None, dtype: str = "auto",
           overwrite: bool = False, measure_drift: bool = True, progress: bool = True) -> dict:
    """Merge, quantize and write ``output_dir``; returns a summary (also saved as ``qft_export.json``)."""
    check_backend(backend)
    check_output_dir(output_dir, overwrite)
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    was_training = trained.training
    trained.eval()
    model = merged_model(trained, base_name, merge_into, masks)
    summary = {"merge_into": merge_into if is_adapted(trained) else None,
               "merged_layers": len(lora_deltas(trained, masks)) if is_adapted(trained) else 0,
               "masks": len(masks or {}), "backend": backend, "config": cfg.to_dict(),
               "calibration": list(tokens.shape)}
    if measure_drift:
        summary["drift"] = drift(trained, model, tokens)
    trained.train(was_training)
    compute = resolve_dtype(dtype, device)
    model = model.to(compute)
    summary["dtype"] = str(compute).replace("torch.", "")
    summary["group_size_warnings"] = check_model(model, cfg)
    t1 = time.perf_counter()
    if backend == "qft":
        quantized, rows = quantize_model(model, cfg, tokens, device=device, progress=progress)
        summary["quantize_s"] = time.perf_counter() - t1
        summary["seconds"] = time.perf_counter() - t0
        out = save_quantized(model, quantized, cfg, output_dir, tokenizer=tokenizer, overwrite=overwrite,
                             report_rows=rows, extra_files={"qft_export.json": summary})
    else:
        out = _export_gptqmodel(model, tokenizer, tokens, output_dir, cfg, overwrite, summary, t0, t1)
    summary["output_dir"] = str(out)
    return summary


def _export_gptqmodel(model, tokenizer, tokens, output_dir, cfg, overwrite, summary, t0, t1):
    """Hand the merged model to GPTQModel (its own solver and packing), with the same grid settings."""
    from gptqmodel import GPTQModel, QuantizeConfig

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.gptqmodel-", dir=out.parent))
    try:
        model.save_pretrained(work / "fp")
        if tokenizer is not None:
            tokenizer.save_pretrained(work / "fp")
        qc = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                            true_sequential=cfg.true_sequential, damp_percent=cfg.damp_percent,
                            act_group_aware=cfg.act_group_aware)
        gm = GPTQModel.load(str(work / "fp"), qc, dtype=next(model.parameters()).dtype, device="cpu")
        gm.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in tokens])
        summary["quantize_s"] = time.perf_counter() - t1
        summary["seconds"] = time.perf_counter() - t0
        gm.save(str(work / "q"))
        (work / "q" / "qft_export.json").write_text(json.dumps(summary, indent=2))
        check_output_dir(out, overwrite)
        _swap_into_place(work / "q", out, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
