"""Activation statistics over the calibration set: each layer's largest input magnitude, per channel.

SmoothQuant needs them per input channel (on the full-precision model); static activation scales
need them per tensor (on the model whose weights are already quantized, as it will run). One pass of
the whole model with forward pre-hooks gives both; only a vector per layer is kept, never activations,
and the forward stops before the LM head (whose fp32 logits, 16 x 512 x 49152 for SmolLM2, were 1.6 GB).
"""
from __future__ import annotations

import torch
from torch import nn

from qft import memory


class _Stop(Exception):
    """Raised before the LM head: the calibration pass has seen every layer it needs."""


def _stop(module, args):
    raise _Stop


@torch.inference_mode()
def input_absmax(model: nn.Module, tokens: torch.Tensor, modules: dict[str, nn.Module], batch_size: int = 16,
                 device=None) -> dict[str, torch.Tensor]:
    """``{name: max |x| over the calibration tokens, per input channel (fp32 [in])}`` for each module."""
    device = torch.device(device or next(model.parameters()).device)
    stats: dict[str, torch.Tensor] = {}

    def hook(mod, args, name):
        x = args[0].detach()
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        stats[name] = m if name not in stats else torch.maximum(stats[name], m)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in modules.items()]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not any(head is m for m in modules.values()):
        handles.append(head.register_forward_pre_hook(_stop))
    try:
        for batch in tokens.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            memory.trim()  # glibc keeps the batch's freed activations otherwise (qft.memory)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(modules) - set(stats))
    if missing:
        raise RuntimeError(f"input_absmax: {missing[:3]} never ran in a forward; cannot calibrate them.")
    return stats
