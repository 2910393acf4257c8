"""``load_quantized(path)``: run an exported GPTQ checkpoint in pure torch, without gptqmodel.

The model is built from ``config.json`` (its ``quantization_config`` set aside, so transformers does not
ask for a GPTQ backend), every linear layer that has ``qweight`` in the checkpoint is swapped for a
``qft.quant.GPTQLinear`` of the same shape, and the state dict is loaded strictly. It reads any
"gptq"-format checkpoint with v1 zero points and int32 packing, ours or gptqmodel's, and AWQ GEMM
checkpoints (read as their dequantized weights, ``_awq_dequantized``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qft.quant import GPTQLinear


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_quantized({str(path)!r}): no *.safetensors file in the directory.")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _awq_dequantized(sd: dict, group_size: int) -> dict:
    """AWQ GEMM tensors as each layer's dequantized weight ``scale * (q - zero)`` (fp32). GPTQ's v1 layout
    cannot hold AWQ's zero point 0, so AWQ layers are read as plain linears with the same values."""
    from qft.quant.pack import unpack_awq

    out = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            codes, scale, zero = unpack_awq(v, sd[f"{name}.qzeros"], sd[f"{name}.scales"])
            g = torch.arange(codes.shape[1]) // group_size
            out[f"{name}.weight"] = scale[:, g] * (codes.float() - zero[:, g])
        elif not k.endswith((".qzeros", ".scales")):
            out[k] = v
    return out


def load_quantized(path, device="cpu", dtype: torch.dtype | None = None):
    """The exported causal LM at ``path`` with ``GPTQLinear`` layers, in eval mode on ``device``.

    ``dtype`` is the dtype of the non-quantized weights and of the compute. By default, the one the
    checkpoint declares; a float16 one whose logits are not finite on a probe batch runs in bf16 instead,
    with a warning (``qft.export.dtype``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .dtype import checkpoint_dtype, loadable_dtype

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_quantized({str(path)!r}): no config.json; is this an exported checkpoint?")
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method is None and raw.get("sparsity_config"):  # pruned, not rounded: a plain checkpoint with zeros
        chosen = dtype or checkpoint_dtype(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=chosen).to(device).eval()
        return loadable_dtype(path, model, chosen, dtype is not None, lambda d: load_quantized(path, device, d))
    if method not in ("gptq", "awq"):
        raise ValueError(f"load_quantized({str(path)!r}): quantization_config.quant_method is {method!r}, expected "
                         "'gptq' or 'awq'.")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq")) if method == "gptq" else \
        str(qc.get("version", qc.get("format", "gemm"))).lower()
    if fmt not in ("gptq", "gemm"):
        raise ValueError(f"load_quantized: {method} format {fmt!r} is not supported; GPTQ with v1 zero points, or "
                         "AWQ GEMM.")
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sd = _read_state_dict(path)
    requested, dtype = dtype is not None, dtype or checkpoint_dtype(path, sd)
    if method == "awq":
        sd = _awq_dequantized(sd, group_size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and f"{name}.qweight" in sd:
            gs = mod.in_features if group_size == -1 else group_size
            q = GPTQLinear(mod.in_features, mod.out_features, bits, gs, bias=mod.bias is not None, dtype=dtype,
                           sym=bool(qc.get("sym", True)))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"load_quantized({str(path)!r}): checkpoint does not match the model: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(device).eval()
    return loadable_dtype(path, model, dtype, requested, lambda d: load_quantized(path, device, d))
