"""Merge trained LoRA adapters into a full-precision base, and measure what the merge changed.

Why reload the base: after QLoRA the model in memory holds NF4 weights, and merging into their
dequantized values bakes NF4's rounding into the weights that GPTQ then rounds again. The default
(Hugging Face's recipe, and the issue's) is therefore to reload the ORIGINAL full-precision weights
(``qft.models.load_model``) and add each adapter's delta ``scaling * B @ A`` to them;
``merge_into="dequantized_nf4"`` instead reproduces the trained model exactly (up to fp rounding) by
merging into the dequantized NF4 weights. Which is better depends on how much the adapter learned to
correct the NF4 error: on the demo's task the original-weight merge loses 12 points of accuracy in fp32
and the NF4 merge none (int4 exports: 82% vs 92%; BENCHMARKS.md, benchmarks/merge_into.py).

PRILoRA masks (``{lora module name: mask shaped like A}``, from ``PRILoRACallback.masks`` or its
checkpoint state) are applied to ``A`` before the product, so a pruned entry never leaks into the merge.

Everything here runs on the CPU, layer by layer: the full-precision model is never put on an accelerator.
"""
from __future__ import annotations

import torch
from torch import nn

MERGE_INTO = ("original", "dequantized_nf4")


def _lora_layers(model: nn.Module, adapter: str):
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            yield name, mod


def base_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the plain HF model's name)."""
    for prefix in ("base_model.model.", "model.base_model.model."):
        if peft_name.startswith(prefix):
            return peft_name[len(prefix):]
    return peft_name


@torch.no_grad()
def lora_deltas(model: nn.Module, masks: dict | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``{base linear name: fp32 delta [out, in]}`` of every LoRA layer of ``adapter`` (masks applied)."""
    masks = {base_name(k): v for k, v in (masks or {}).items()}
    deltas = {}
    for name, mod in _lora_layers(model, adapter):
        if getattr(mod, "use_dora", {}).get(adapter, False):
            raise NotImplementedError(f"merge: {name} uses DoRA; qft export merges plain LoRA adapters only.")
        A = mod.lora_A[adapter].weight.detach().float().cpu()
        B = mod.lora_B[adapter].weight.detach().float().cpu()
        key = base_name(name)
        mask = masks.get(key)
        if mask is not None:
            if mask.shape != A.shape:
                raise ValueError(f"merge: PRILoRA mask for {key} has shape {tuple(mask.shape)}, A has {tuple(A.shape)}.")
            A = A * mask.float().cpu()
        delta = (B @ A) * float(mod.scaling[adapter])
        if getattr(mod, "fan_in_fan_out", False):
            delta = delta.t()
        deltas[key] = delta
    return deltas


def dequantized_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{base linear name: fp32 weight}`` of every bitsandbytes 4-bit layer in ``model``."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and getattr(w, "quant_state", None) is not None and type(w).__name__ == "Params4bit":
            import bitsandbytes.functional as bnbF

            out[base_name(name).removesuffix(".base_layer")] = bnbF.dequantize_4bit(w.data, w.quant_state).float().cpu()
    return out


@torch.no_grad()
def merge_adapters(trained: nn.Module, base: nn.Module | str, merge_into: str = "original",
                   masks: dict | None = None, adapter: str = "default") -> nn.Module:
    """A plain fp32 HF model: ``base`` (a model or a ``qft.models`` name, reloaded from the original weights)
    plus the adapters of ``trained``; with ``merge_into="dequantized_nf4"`` the linear weights are first
    replaced by the dequantized NF4 weights of ``trained``. ``trained`` is left unchanged."""
    if merge_into not in MERGE_INTO:
        raise ValueError(f"merge_into={merge_into!r} is unknown; allowed: {list(MERGE_INTO)}.")
    if isinstance(base, str):
        from qft.models import load_model

        base = load_model(base, dtype=torch.float32)
    base = base.float().cpu().eval()
    linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    if merge_into == "dequantized_nf4":
        deq = dequantized_base_weights(trained)
        if not deq:
            raise ValueError("merge_into='dequantized_nf4' but the trained model has no NF4 (bitsandbytes 4-bit) layers; "
                             "use merge_into='original'.")
        for n, w in deq.items():
            if n not in linears or linears[n].weight.shape != w.shape:
                raise KeyError(f"merge: NF4 layer {n} has no matching linear of shape {tuple(w.shape)} in the base.")
            linears[n].weight.copy_(w)
    deltas = lora_deltas(trained, masks, adapter)
    for n, d in deltas.items():
        if n not in linears or linears[n].weight.shape != d.shape:
            raise KeyError(f"merge: adapter layer {n} has no matching linear of shape {tuple(d.shape)} in the base; "
                           "was the adapter trained on a different model?")
        linears[n].weight.add_(d)
    # trainable non-adapter weights (e.g. modules_to_save or a full fine-tune) are copied as trained
    trained_params = {base_name(n): p for n, p in trained.named_parameters() if p.requires_grad and "lora_" not in n}
    own = dict(base.named_parameters())
    for n, p in trained_params.items():
        n = n.replace(".modules_to_save.default", "")
        if n in own and own[n].shape == p.shape:
            own[n].copy_(p.detach().float().cpu())
    return base


@torch.no_grad()
def drift(reference: nn.Module, merged: nn.Module, tokens: torch.Tensor, max_samples: int = 4,
          max_len: int = 256) -> dict:
    """How far ``merged`` is from the trained ``reference`` on calibration batches.

    ``kl``: mean over tokens of KL(p_reference || p_merged); ``max_logit_diff``: max |logit difference|.
    Runs on the CPU on ``max_samples x max_len`` tokens (enough to catch a wrong merge, cheap to run).
    """
    x = tokens[:max_samples, :max_len].cpu()
    kls, mx = [], 0.0
    ref_dev = next(reference.parameters()).device
    for row in x:
        a = reference(input_ids=row[None].to(ref_dev)).logits.float().cpu()
        b = merged(input_ids=row[None]).logits.float()
        pa, pb = a.log_softmax(-1), b.log_softmax(-1)
        kls.append((pa.exp() * (pa - pb)).sum(-1).mean())
        mx = max(mx, float((a - b).abs().max()))
    return {"kl": float(torch.stack(kls).mean()), "max_logit_diff": mx, "tokens": int(x.numel())}
