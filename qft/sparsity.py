"""Keeping a pruned model's zeros through fine-tuning, merge and export.

A checkpoint pruned by qft's export (``GPTQConfig(sparsity=...)``, any method) records ``sparsity_config``
in its ``config.json``. A model loaded from it is *sparse*, and the exact zeros of its decoder linears are
its masks: nothing else needs to be stored, and every step reads this one fact (``is_sparse``):

- **training**: ``protect_zeros`` hooks each trainable decoder weight so its gradient is zero where the
  weight is zero; Adam's moments then stay zero there and weight decay scales 0 to 0, so the pruned
  weights stay exactly 0 (``CausalLMModule`` calls it when it builds a sparse model). Frozen bases
  (LoRA, QLoRA: NF4 has an exact 0 code) need nothing;
- **merge**: a LoRA delta is masked where the base weight is zero (``qft.export.merge``);
- **export**: GPTQ/RTN hold the zeros as a fixed mask (``quantize_model(keep_zeros=True)``), so a later
  int4 export of the recovered model is as sparse as the pruned one.
"""
from __future__ import annotations

from torch import nn

from qft import layers


def is_sparse(model: nn.Module) -> bool:
    """Whether ``model`` (HF, peft or Lightning-wrapped) was loaded from a pruned checkpoint."""
    inner = model if hasattr(model, "config") else getattr(model, "model", None)  # a LightningModule holds .model
    config = getattr(layers.unwrap(inner), "config", None) if inner is not None else None
    return bool(getattr(config, "sparsity_config", None))


def decoder_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{HF layer name: weight Parameter}`` of the plain linears in the decoder blocks."""
    from qft.export.blocks import find_decoder_blocks

    hf = layers.unwrap(model)
    prefix, blocks = find_decoder_blocks(hf)
    out = {}
    for i, b in enumerate(blocks):
        for n, m in layers.linear_layers(b).items():
            base = getattr(m, "base_layer", m)
            w = getattr(base, "weight", None)
            if isinstance(w, nn.Parameter) and w.is_floating_point():
                out[f"{prefix}.{i}.{n}"] = w
    return out


def protect_zeros(model: nn.Module) -> int:
    """Mask the gradients of every trainable decoder weight where it is zero; returns how many weights
    were hooked (0 for a frozen base)."""
    n = 0
    for w in decoder_weights(model).values():
        if w.requires_grad and not getattr(w, "_qft_zeros_protected", False):
            keep = (w.detach() != 0).to(w.dtype)
            w.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))
            w._qft_zeros_protected = True
            n += 1
    return n


def zero_fraction(model: nn.Module) -> float:
    """The fraction of the decoder linears' weights that are exactly zero."""
    ws = decoder_weights(model).values()
    return sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)

