"""``QuantizedWeight``: one layer's integer codes and grid, the currency between QAT, GPTQ and the writers.

QAT's fake-quant layers (``export_params``), converted ``GPTQLinear`` layers and the GPTQ/RTN solvers
all produce one, and every checkpoint writer consumes one, so a grid learned in training reaches the
file without being recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """Integer codes and the grid of one linear layer, in the original column order."""

    codes: torch.Tensor  # int32 [out, in]
    scale: torch.Tensor  # fp32 (fp16-representable) [out, n_groups]
    zero: torch.Tensor  # fp32 integers [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1 = per output row
    damp_percent: float = 0.0
    loss: float = 0.0  # GPTQ's sum of (w - q)^2 / [H^-1]_jj^2 / 2
    rel_error: float = 0.0  # ||(W-Q) X||^2 / ||W X||^2 on the calibration inputs

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scale[:, g] * (self.codes.float() - self.zero[:, g])

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The output rows ``[start, stop)``, to split a jointly solved q/k/v back into layers."""
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop], self.g_idx,
                               self.bits, self.group_size, self.damp_percent, self.loss, self.rel_error)

    def cpu(self) -> "QuantizedWeight":
        self.codes, self.scale, self.zero, self.g_idx = (t.cpu()
                                                         for t in (self.codes, self.scale, self.zero, self.g_idx))
        return self

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack layers that share an input (q/k/v) into one tall weight, as the solver sees them."""
        first = parts[0]
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                               torch.cat([p.zero for p in parts]), first.g_idx, first.bits, first.group_size)


@dataclass
class InputGrid:
    """How a layer quantizes its input, the activation half of a weight-and-activation grid.

    ``scale``/``zero`` are the fixed per-tensor values of a static grid (calibrated, or observed in
    QAT); they are None where the scale is computed from each input at run time (``scheme.dynamic``),
    and for a static grid whose observer has seen no data yet.
    """

    scheme: QuantScheme
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None

    @property
    def static(self) -> bool:
        return not self.scheme.dynamic
