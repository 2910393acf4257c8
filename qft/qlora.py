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

from . import memory
from .tensor_stream import TensorFiles, place

QUANTIZATIONS = ("none", "nf4", "nf4-dq")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # lazy: only NF4 users need it
        raise ImportError("quantization='nf4' needs bitsandbytes>=0.49: pip install 'bitsandbytes>=0.49'") from e
    return bnb


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, double_quant: bool, compute_dtype: torch.dtype):
    """A frozen NF4 ``Linear4bit`` quantised on the CPU from ``weight`` (read as fp32, so the codes do not
    depend on the dtype the weight arrived in)."""
    bnb = _bnb()
    out_f, in_f = weight.shape
    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32), requires_grad=False,
                                 compress_statistics=double_quant, quant_type="nf4", module=q)._quantize("cpu")
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to("cpu").clone(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False  # see module docstring: keep the layout merge-safe
    return q


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or name.endswith(p) for p in skip)


def quantize_nf4(model: nn.Module, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                 skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except names matching ``skip``) by a frozen NF4
    ``bitsandbytes.nn.Linear4bit``, quantised from the current weights. Returns the number swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or _skipped(full, skip):
                continue
            q = nf4_linear(child.weight, child.bias, double_quant, compute_dtype)
            if child.weight.device.type != "cpu":
                q = q.to(child.weight.device)
            setattr(module, child_name, q)
            swapped += 1
    model.is_loaded_in_4bit = True
    return swapped


def _to_weight_dtype(module, args):
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _to_fp32(module, args, out):
    return out.float()


def fp32_interface(module: nn.Module) -> None:
    """Let a low-precision frozen module (bf16 embeddings or head) take and give fp32 like the rest of the
    model: floating inputs are cast to its weight's dtype, its output back to fp32. Under bf16 autocast
    this changes nothing (the matmul runs in bf16 either way); outside it, code that runs the model in
    fp32 (evaluation, the export's drift check) keeps working."""
    module.register_forward_pre_hook(_to_weight_dtype)
    module.register_forward_hook(_to_fp32)


def load_nf4(path, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """The NF4 base of the safetensors checkpoint in ``path``, built one tensor at a time.

    The model skeleton is created with its parameters on the meta device (``accelerate``'s
    ``init_empty_weights``; buffers such as rotary frequencies stay real), and each tensor is read from
    disk into its own buffer when it is placed (``qft.tensor_stream``, not a memory map): a linear weight
    is quantised to NF4 at once and its fp32 copy dropped; the frozen embeddings and LM head are converted
    to ``compute_dtype`` (bf16 where supported) chunk by chunk as they are read; norms stay fp32. The whole fp32 model never exists, so the peak is about the NF4
    model plus the largest single tensor. The codes equal ``quantize_nf4`` on the fp32 model (test).
    The low-precision embeddings and head take and give fp32 (``fp32_interface``), so the residual stream
    keeps the precision it had and fp32 callers keep working.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = TensorFiles(path)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]
    for i, name in enumerate(linears, 1):  # one weight in memory at a time, quantized at once
        bias = files.read(f"{name}.bias") if model.get_submodule(name).bias is not None else None
        parent, _, child = name.rpartition(".")
        q = nf4_linear(files.read(f"{name}.weight"), bias, double_quant, compute_dtype)
        setattr(model.get_submodule(parent) if parent else model, child, q)
        if i % 8 == 0:
            memory.trim()  # the freed fp32 weights, back to the OS (qft.memory)
    embed = model.get_input_embeddings()
    low = {id(embed.weight), id(model.get_output_embeddings().weight)}
    done = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
    current = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # the meta tensors to replace
    for key in (k for k in files.names() if k not in done):
        if key not in current:
            raise KeyError(f"load_nf4({str(path)!r}): the checkpoint holds {key!r}, which the model has no place for.")
        old = current[key]
        place(model, key, files.read(key, compute_dtype if id(old) in low else old.dtype))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise KeyError(f"load_nf4({str(path)!r}): the checkpoint lacks {missing[:3]}.")
    for module in {embed, model.get_output_embeddings()}:
        if module.weight.dtype != torch.float32:
            fp32_interface(module)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True
    memory.trim()
    return model
