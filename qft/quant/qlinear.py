"""``GPTQLinear``: a linear layer stored in the GPTQ checkpoint layout, run in pure torch.

It is what ``qft.qat.convert`` produces and what ``qft.load_quantized`` builds from an exported
checkpoint, so converted QAT models and exported checkpoints run the same code on any device.
The dequantised weight is cached on first use (eval is the point; memory is the trade).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pack import pack_gptq, unpack_gptq, unpack_rows
from .qweight import QuantizedWeight


class GPTQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, sym: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.sym = sym  # the grid's symmetry (zeros are stored either way); re-export writes it to the config
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._w = None
        self._register_load_state_dict_pre_hook(lambda *a, **k: self._drop_cache())

    @classmethod
    def from_codes(cls, codes, scale, zero, g_idx, bits: int, group_size: int, bias=None, sym: bool = True):
        """Build from integer ``codes [out,in]``, ``scale/zero [out,n_groups]`` and ``g_idx [in]``."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias=bias is not None,
                dtype=bias.dtype if bias is not None else torch.float16, sym=sym)
        for k, v in pack_gptq(codes, scale, zero, g_idx, bits).items():
            getattr(m, k).copy_(v)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m.to(codes.device)

    def _drop_cache(self):
        self._w = None

    def _apply(self, fn, recurse=True):
        self._w = None
        return super()._apply(fn, recurse)

    def quantized_weight(self) -> QuantizedWeight:
        """The codes and grid this layer holds (inverse of ``from_codes``), for re-export without a solve."""
        codes = unpack_rows(self.qweight, self.bits).t().contiguous()
        zero = (unpack_rows(self.qzeros.t().contiguous(), self.bits).t() + 1).t().float().contiguous()
        group = -1 if self.group_size >= self.in_features else self.group_size
        return QuantizedWeight(codes, self.scales.float().t().contiguous(), zero, self.g_idx.clone(), self.bits, group)

    def dequantized_weight(self) -> torch.Tensor:
        return unpack_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._w is None or self._w.dtype != x.dtype or self._w.device != x.device:
            self._w = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")
