"""NF4 base weights (bitsandbytes) under peft LoRA adapters, with the known CPU traps handled.

Two traps decide the shape of this file:

- peft picks its 4-bit-aware LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) only when
  ``model.is_loaded_in_4bit`` is true; otherwise it wraps a ``Linear4bit`` as a plain Linear and its
  merge silently adds the delta to packed uint8 bytes. We set the flag ourselves, since we swap the
  layers by hand (Lightning's ``BitsandbytesPrecision`` refuses the CPU).
- On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into a CPU-only layout on the first
  no-grad eval forward (and asserts ``out_features % 32 == 0``). A later merge or ``.to()`` of the
  repacked weight is silently wrong. We switch that fast path off per layer
  (``support_avx512bf16_for_cpu = False``): eval is slightly slower, merges stay exact.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "nf4-dq")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # lazy: only NF4 users need it
        raise ImportError("quantization='nf4' needs bitsandbytes>=0.49: pip install 'bitsandbytes>=0.49'") from e
    return bnb


def quantize_nf4(model: nn.Module, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                 skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except names matching ``skip``) by a frozen NF4
    ``bitsandbytes.nn.Linear4bit``, quantised from the current weights. Returns the number swapped."""
    bnb = _bnb()
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(fnmatch.fnmatch(full, p) or full.endswith(p) for p in skip):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                         compress_statistics=double_quant, quant_type="nf4", module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            q.weight = q.weight._quantize("cpu") if child.weight.device.type == "cpu" else q.weight.to(child.weight.device)
            q.support_avx512bf16_for_cpu = False  # see module docstring: keep the layout merge-safe
            setattr(module, child_name, q)
            swapped += 1
    model.is_loaded_in_4bit = True
    return swapped

