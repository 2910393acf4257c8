"""Activation quantizers: dynamic per-token/per-tensor ranges, or a moving-average min/max observer.

The observer's statistics are buffers (so checkpoints carry them) and each update all-reduces the
batch min/max across DDP ranks before averaging, so every rank holds the same range and therefore
the same scale. The update happens only in training mode while ``observing`` is set (the callback
clears it at ``freeze_observers_step``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qft.quant import InputGrid, QuantScheme
from qft.quant.grid import activation_params

from .fake_quant import per_token_params, ste_fake_quant


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor):
    """Global ``(min, max)`` over all ranks (one MAX all-reduce of ``[-min, max]``); no-op without a group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([-lo, hi]).float()
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -both[0], both[1]
    return lo, hi


class ActivationFakeQuant(nn.Module):
    """Fake-quantizes a layer's input on ``scheme``'s grid (STE rounding)."""

    def __init__(self, scheme: QuantScheme, momentum: float = 0.01):
        super().__init__()
        self.scheme, self.momentum = scheme, momentum
        self.observed = scheme.granularity == "per_tensor" and not scheme.dynamic
        if self.observed:
            self.register_buffer("min_val", torch.zeros(()))
            self.register_buffer("max_val", torch.zeros(()))
            self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
            self.register_buffer("observing", torch.ones((), dtype=torch.bool))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = all_reduce_range(x.detach().amin().float(), x.detach().amax().float())
        if self.num_updates == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.add_(self.momentum * (lo - self.min_val))
            self.max_val.add_(self.momentum * (hi - self.max_val))
        self.num_updates += 1

    def qparams(self, x: torch.Tensor):
        s = self.scheme
        if s.granularity == "per_token":
            return per_token_params(x, s.bits, s.symmetric)
        if s.dynamic:  # per_tensor, range of this rank's batch (dynamic ranges are local, like per_token)
            xd = x.detach().float()
            return activation_params(xd.amin(), xd.amax(), s.bits, s.symmetric)
        return activation_params(self.min_val, self.max_val, s.bits, s.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observed and self.training and bool(self.observing):
            self.observe(x)
        if self.observed and self.num_updates == 0:
            return x  # nothing observed yet (e.g. eval before any training step): pass through
        scale, zero = self.qparams(x)
        return ste_fake_quant(x.float(), scale, zero, self.scheme.maxq).to(x.dtype)

    def grid(self) -> InputGrid:
        """The input grid an export writes: the scheme, and for an observer the scale and zero its
        fake-quant uses now (``qparams``), so the exported layer quantizes inputs as training did (None
        before it has observed anything)."""
        if not self.observed or int(self.num_updates) == 0:
            return InputGrid(self.scheme)
        scale, zero = activation_params(self.min_val, self.max_val, self.scheme.bits, self.scheme.symmetric)
        return InputGrid(self.scheme, scale.reshape(1), zero.reshape(1))

    def extra_repr(self) -> str:
        s = self.scheme
        return f"bits={s.bits}, granularity={s.granularity}, symmetric={s.symmetric}, dynamic={s.dynamic}"
