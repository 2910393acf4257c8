"""SmoothQuant (Xiao et al., ICML 2023, arXiv:2211.10438): move activation outliers into the weights.

A few input channels of a transformer's linears carry activations far larger than the rest, and one
int8 scale per token (or per tensor) must cover them, which wastes the grid on every other channel.
Dividing channel ``j`` of the input by ``s_j`` and multiplying column ``j`` of the weight by ``s_j``
leaves the product unchanged; with ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (the paper's eq. 4)
both sides become about equally hard to quantize. The division is folded into the norm that produces
the input (its elementwise weight, and bias if any), so it costs nothing at run time.

Which linears read a norm's output is found by running the model once with hooks (the tensor a norm
returns is, by identity, the input of q/k/v or gate/up), not from a per-architecture table. Linears
whose input no elementwise norm produces (o_proj, down_proj in Llama) are left alone, as in the paper.
"""
from __future__ import annotations

import torch
from torch import nn


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                     eps: float = 1e-5) -> torch.Tensor:
    """Per-channel ``s = max|X|^alpha / max|W|^(1-alpha)``; channels with no weight or no activation keep 1."""
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.clamp_min(eps).pow(alpha) / w.clamp_min(eps).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp_min(eps)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``norm``'s output channels by ``s`` and scale the matching weight columns by ``s``."""
    norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))


def _elementwise(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return not list(m.children()) and isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, nn.Linear)


@torch.inference_mode()
def norm_feeds(model: nn.Module, linears: dict[str, nn.Module], sample: torch.Tensor) -> list[tuple[str, list[str]]]:
    """``[(norm name, [names of the linears that read exactly its output])]``, found on one forward of
    ``sample`` (token ids ``[1, n]``). Only elementwise leaf modules (RMSNorm, LayerNorm) count."""
    outputs: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    keep = []  # the outputs stay alive during the forward, so ids are not reused
    handles = []
    for name, m in model.named_modules():
        if _elementwise(m):
            def post(mod, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    keep.append(out)
                    outputs[id(out)] = name
            handles.append(m.register_forward_hook(post))
    for name, lin in linears.items():
        def pre(mod, args, name=name):
            norm = outputs.get(id(args[0]))
            if norm is not None and name not in readers.setdefault(norm, []):
                readers[norm].append(name)
        handles.append(lin.register_forward_pre_hook(pre))
    try:
        model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return [(n, lins) for n, lins in readers.items() if modules[n].weight.numel() == linears[lins[0]].in_features]


def smooth(model: nn.Module, linears: dict[str, nn.Module], act_absmax: dict[str, torch.Tensor],
           pairs: list[tuple[str, list[str]]], alpha: float) -> dict[str, float]:
    """Fold SmoothQuant scales into each ``(norm, linears)`` pair; returns each norm's largest scale."""
    modules = dict(model.named_modules())
    report = {}
    for norm, names in pairs:
        lins = [linears[n] for n in names]
        w_absmax = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in lins]).amax(0)
        s = smoothing_scales(act_absmax[names[0]], w_absmax, alpha)
        fold(modules[norm], lins, s)
        report[norm] = float(s.max())
    return report
