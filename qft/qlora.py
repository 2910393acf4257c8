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


def load_nf4(path, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """The NF4 base of the safetensors checkpoint in ``path``, built one tensor at a time.

    The model skeleton is created with its parameters on the meta device (``accelerate``'s
    ``init_empty_weights``; buffers such as rotary frequencies stay real), and each tensor is read from
    disk into its own buffer when it is placed (``qft.tensor_stream``, not a memory map): a linear weight
    is quantised to NF4 at once and its fp32 copy dropped; every other floating tensor (the frozen
    embeddings, norms and LM head) is converted to ``compute_dtype`` chunk by chunk as it is read. The whole
    fp32 model never exists, so the set-up peaks at about the NF4 model plus the largest single tensor. The
    codes equal ``quantize_nf4`` on the fp32 model (test).

    Why the norms too: they decide the residual stream's dtype. With fp32 norms (or bf16 embeddings that
    hand back fp32) the stream, and every activation autograd saves between the NF4 matmuls, is fp32, and
    at a real batch that costs more than NF4 saves on the weights. Measured on SmolLM2-135M + LoRA r=8,
    8 x 256 tokens, bf16 autocast, 2 CPU cores: peak RSS 7566 MB with an fp32 stream, 5935 MB with a bf16
    one (plain bf16 LoRA: 6064 MB), and the step 8.7 s vs 7.0 s. This is what loading a 4-bit model with
    ``torch_dtype=compute_dtype`` in transformers gives too. With ``compute_dtype=float32`` nothing changes.
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
    done = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
    current = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # the meta tensors to replace
    for key in (k for k in files.names() if k not in done):
        if key not in current:
            raise KeyError(f"load_nf4({str(path)!r}): the checkpoint holds {key!r}, which the model has no place for.")
        old = current[key]
        place(model, key, files.read(key, compute_dtype if old.is_floating_point() else old.dtype))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise KeyError(f"load_nf4({str(path)!r}): the checkpoint lacks {missing[:3]}.")
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True
    memory.trim()
    return model
