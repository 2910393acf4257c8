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

Which layers can absorb the scale is found by running the model, not from a per-architecture table:
the tensor a norm returns is, by identity, the input of q/k/v or gate/up; and a linear of the same block
feeds another linearly when doubling its weight exactly doubles the other's input (checked on the first
block, applied to every block). Linears with neither (o_proj under grouped-query attention) are left alone.
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
def fold(producer: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` (a norm's elementwise weight, or a linear's rows) and
    scale the matching weight columns of ``linears`` by ``s``."""
    w = producer.weight
    w.copy_((w.float() / (s if w.dim() == 1 else s[:, None])).to(w.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))


def _elementwise(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return not list(m.children()) and isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, nn.Linear)


@torch.inference_mode()
def smoothing_pairs(model: nn.Module, linears: dict[str, nn.Module],
                    sample: torch.Tensor) -> list[tuple[str, list[str]]]:
    """``[(producer, [linears whose input it produces])]``: each norm with the linears that read exactly
    its output (found on one forward of ``sample``, token ids ``[1, n]``; only elementwise leaf modules
    such as RMSNorm and LayerNorm count), then ``linear_feeds``' pairs for the linears no norm feeds."""
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
    pairs = [(n, lins) for n, lins in readers.items() if modules[n].weight.numel() == linears[lins[0]].in_features]
    fed = {x for _, lins in pairs for x in lins}
    return pairs + linear_feeds(model, {n: m for n, m in linears.items() if n not in fed}, linears, sample)


def _input_of(model, lin, sample) -> torch.Tensor:
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
    finally:
        h.remove()
    return seen[0]


@torch.inference_mode()
def linear_feeds(model: nn.Module, consumers: dict[str, nn.Module], linears: dict[str, nn.Module],
                 sample: torch.Tensor) -> list[tuple[str, list[str]]]:
    """``[(producer linear, [consumer linear])]``: pairs where scaling the producer's output rows scales
    the consumer's input channels by the same factor (``up_proj`` -> ``down_proj``), found on the first
    decoder block by doubling each candidate's weight and applied to every block with the same names."""
    from qft.export.blocks import find_decoder_blocks

    prefix, blocks = find_decoder_blocks(model)
    head = f"{prefix}.0."
    found = []
    for cname, consumer in consumers.items():
        if not cname.startswith(head):
            continue
        x0 = None
        for pname, producer in linears.items():
            if not pname.startswith(head) or pname == cname or producer.out_features != consumer.in_features:
                continue
            x0 = _input_of(model, consumer, sample) if x0 is None else x0
            producer.weight.mul_(2)
            try:
                x1 = _input_of(model, consumer, sample)
            finally:
                producer.weight.div_(2)
            if torch.allclose(x1.float(), 2 * x0.float(), rtol=1e-2, atol=1e-6):
                found.append((pname[len(head):], cname[len(head):]))
                break
    return [(f"{prefix}.{i}.{p}", [f"{prefix}.{i}.{c}"]) for i in range(len(blocks)) for p, c in found
            if f"{prefix}.{i}.{p}" in linears and f"{prefix}.{i}.{c}" in consumers]


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
