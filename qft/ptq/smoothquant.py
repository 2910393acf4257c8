"""SmoothQuant (Xiao et al., ICML 2023, arXiv:2211.10438): move activation outliers into the weights.

A few input channels of a transformer's linears carry activations far larger than the rest, and one
int8 scale per token (or per tensor) must cover them, which wastes the grid on every other channel.
Dividing channel ``j`` of the input by ``s_j`` and multiplying column ``j`` of the weight by ``s_j``
leaves the product unchanged; with ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (the paper's eq. 4)
both sides become about equally hard to quantize. The division is folded into the norm that produces
the input (its elementwise weight, and bias if any), so it costs nothing at run time.

The scale can also be folded into a linear whose output rows feed the input channels linearly: Llama's
``down_proj`` reads ``act(gate_proj(x)) * up_proj(x)``, so dividing ``up_proj``'s rows by ``s`` divides
``down_proj``'s input channels by ``s``. That is where SmolLM2's largest activations are (measured:
without it, per-token int8 costs 5% perplexity; llm-compressor's Llama mappings smooth it too).

Which layers can absorb the scale, how the scale folds into each norm convention (Gemma's ``1 + w``
among them) and the check that every fold left the model's function unchanged are AWQ's too; they live
in ``qft.export.fold``.
"""
from __future__ import annotations

import torch
from torch import nn

from qft.export.fold import FoldCheck, fold, norm_offset


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                     eps: float = 1e-5) -> torch.Tensor:
    """Per-channel ``s = max|X|^alpha / max|W|^(1-alpha)``; channels with no weight or no activation keep 1."""
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.clamp_min(eps).pow(alpha) / w.clamp_min(eps).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp_min(eps)


def smooth(model: nn.Module, linears: dict[str, nn.Module], act_absmax: dict[str, torch.Tensor],
           pairs: list[tuple[str, list[str]]], alpha: float, check: FoldCheck | None = None) -> dict[str, float]:
    """Fold SmoothQuant scales into each ``(producer, linears)`` pair; returns each folded producer's largest
    scale. With ``check`` (``qft.export.fold.FoldCheck``, what the export uses) each fold is kept only if
    its block computes what it did; without, folds are exact for the producer's norm convention but not
    checked."""
    modules = dict(model.named_modules())
    report = {}
    for producer, names in pairs:
        lins = [linears[n] for n in names]
        w_absmax = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in lins]).amax(0)
        s = smoothing_scales(act_absmax[names[0]], w_absmax, alpha)
        if check is not None:
            if not check.apply(producer, names, s):
                continue
        else:
            module = modules[producer]
            offset = norm_offset(module) if module.weight.dim() == 1 else 0.0
            if offset is None:
                continue
            fold(module, lins, s, offset)
        report[producer] = float(s.max())
    return report
