"""``W8A8Linear``: int8 weights with a scale per output channel, int8 inputs, computed exactly as a
compressed-tensors ``int-quantized`` checkpoint declares it.

Its state is the checkpoint's (``weight`` int8 ``[out, in]``, ``weight_scale`` fp32 ``[out, 1]``,
``input_scale`` fp32 ``[1]`` for static activations), so the reference that qft evaluates and the file
that vLLM serves are one set of numbers. The forward quantizes the input on the activation
``QuantScheme`` (per token at run time, or the calibrated per-tensor scale; symmetric, integers in
[-128, 127]), multiplies the integers, and rescales: ``y = (s_x q_x) (s_w q_w)^T + b``.

``int8_kernel=True`` multiplies with ``torch._int_mm`` (int8 x int8 -> int32) where this build has it;
the default multiplies the dequantized values in fp32 (``(s_x q_x) (s_w q_w)^T``, the operands QAT's
fake-quant forms, so a QAT-trained layer exported keeps its outputs bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qft.quant import InputGrid, QuantizedWeight, QuantScheme
from qft.quant.grid import activation_params

ZERO = 128  # the symmetric 8-bit grid's zero point in qft's unsigned convention (codes 0..255)


def input_scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The static per-tensor scale of an input whose calibrated range is ``[-absmax, absmax]``."""
    scale, _ = activation_params(-absmax.float().reshape(1), absmax.float().reshape(1), 8, True)
    return scale


class W8A8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, int8_kernel: bool = False):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise TypeError(f"W8A8Linear: weight must be int8 [out, in], got {weight.dtype} {tuple(weight.shape)}.")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(self.out_features, 1))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().reshape(1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.int8_kernel = int8_kernel

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias=None, input_scale=None, int8_kernel: bool = False):
        """From a per-channel symmetric 8-bit ``QuantizedWeight`` (RTN, GPTQ or QAT's learned grid)."""
        if qw.bits != 8 or qw.scale.shape[1] != 1 or not torch.all(qw.zero == ZERO):
            raise ValueError(f"W8A8Linear.from_quantized: needs a symmetric 8-bit grid with one scale per output "
                             f"channel; got bits={qw.bits}, {qw.scale.shape[1]} groups per row.")
        return cls((qw.codes - ZERO).to(torch.int8), qw.scale[:, :1], input_scale, bias, int8_kernel)

    @property
    def dynamic(self) -> bool:
        return self.input_scale is None

    @property
    def activation_scheme(self) -> QuantScheme:
        if self.dynamic:
            return QuantScheme(bits=8, symmetric=True, granularity="per_token", dynamic=True)
        return QuantScheme(bits=8, symmetric=True, granularity="per_tensor")

    def input_grid(self) -> InputGrid:
        """The input's grid in qft's currency (``qft.layers.input_grid``); zero 128 as for the weights."""
        if self.dynamic:
            return InputGrid(self.activation_scheme)
        return InputGrid(self.activation_scheme, self.input_scale.clone(), torch.full((1,), float(ZERO)))

    def quantized_weight(self) -> QuantizedWeight:
        """The weight's grid in qft's currency (codes 0..255 around zero 128)."""
        n_out = self.out_features
        return QuantizedWeight(self.weight.to(torch.int32) + ZERO, self.weight_scale.clone(),
                               torch.full((n_out, 1), float(ZERO)), torch.zeros(self.in_features, dtype=torch.int32),
                               8, -1)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(integers in [-128, 127] as fp32, their scale)``: per token, or the calibrated scale."""
        xf = x.float()
        if self.dynamic:
            absmax = xf.abs().amax(-1, keepdim=True)
            scale, _ = activation_params(-absmax, absmax, 8, True)
        else:
            scale = self.input_scale
        return torch.clamp(torch.round(xf / scale), -ZERO, ZERO - 1), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, sx = self.quantize_input(x)
        bias = None if self.bias is None else self.bias.float()
        if not self.int8_kernel:  # the dequantized operands, exactly as QAT's fake-quant forms them, so a
            # layer exported from QAT computes what training computed bit for bit (fp32)
            return F.linear(q * sx, self.dequantized_weight(), bias).to(x.dtype)
        flat = q.reshape(-1, self.in_features).to(torch.int8)
        acc = torch._int_mm(flat, self.weight.t()).reshape(*q.shape[:-1], self.out_features).float()
        y = acc * sx * self.weight_scale.reshape(-1)
        return (y if bias is None else y + bias).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "dynamic per-token" if self.dynamic else "static per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, {kind} int8 inputs"
