"""Pruning as an export step: which weights become zero, and the weight that holds them.

Three ways to choose, all per layer and on the calibration statistics the export already collects:

- ``magnitude``: the smallest ``|W|`` of the layer (the documents' procedure; needs no data);
- ``wanda`` (Sun et al., 2023, arXiv:2306.11695): the smallest ``|W_ij| * ||x_j||`` compared within each
  output row, where ``||x_j||^2`` is the Hessian's diagonal (no weight update);
- ``sparsegpt`` (Frantar & Alistarh, 2023, arXiv:2301.00774): chosen inside GPTQ's lazy-batch solve
  (``qft.export.gptq.gptq_solve``), column block by column block, by ``w^2 / [H^-1]_jj^2``, the error of
  each pruned weight being compensated on the columns not yet visited; with rounding in the same pass
  when the export also quantizes (the SparseGPT paper's joint mode).

``unstructured`` pruning picks any ``sparsity`` fraction; ``2:4`` zeroes 2 of every 4 consecutive input
weights of a row (the pattern sparse tensor cores and ``torch.sparse`` semi-structured kernels run).

``PrunedWeight`` is what a layer pruned without rounding (``method="none"``) hands the writer: the
floating-point weight with its zeros, with the same ``rows``/``dequantize`` protocol as
``QuantizedWeight``, so the export's commit and report treat both alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")


def pattern_nm(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` for an ``"n:m"`` pattern (zero n of every m), None for unstructured."""
    if pattern == "unstructured":
        return None
    keep, m = (int(x) for x in pattern.split(":"))
    return m - keep, m


def _lowest(score: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = pruned) of the lowest ``score`` [out, in]: ``sparsity`` of each row (or of
    the whole layer), or the n lowest of every m consecutive inputs of a row."""
    nm = pattern_nm(pattern)
    if nm is not None:
        n, m = nm
        out_f, in_f = score.shape
        s = score.reshape(out_f, in_f // m, m)
        idx = s.topk(n, dim=-1, largest=False).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)
    if per_row:
        k = int(score.shape[1] * sparsity)
        if k == 0:
            return torch.zeros_like(score, dtype=torch.bool)
        idx = score.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    k = int(score.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = score.flatten().kthvalue(k).values
    return score <= thresh


def magnitude_mask(W: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    return _lowest(W.detach().float().abs(), sparsity, pattern, per_row=False)


def wanda_mask(W: torch.Tensor, h_diag: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """Wanda's score ``|W| * ||x||`` (``h_diag`` is proportional to ``||x||^2``), compared per output row."""
    return _lowest(W.detach().float().abs() * h_diag.float().clamp_min(0).sqrt(), sparsity, pattern, per_row=True)


def block_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """SparseGPT's choice for one lazy block ``W1`` [block, out] (columns of W as rows, as the solve holds
    them) with ``d = diag(U)`` of the block: the lowest ``w^2 / d^2``, over the whole block when
    unstructured (the paper's adaptive mask selection), or n of every m columns per output row."""
    score = W1.square() / d[:, None].square()
    nm = pattern_nm(pattern)
    if nm is not None:
        return _lowest(score.t().contiguous(), sparsity, pattern, per_row=True).t()
    return _lowest(score, sparsity, pattern, per_row=False)


def sparsity_of(W: torch.Tensor) -> float:
    return float((W == 0).float().mean())


@dataclass
class PrunedWeight:
    """A layer's pruned floating-point weight (no rounding), in ``QuantizedWeight``'s currency."""

    weight: torch.Tensor  # fp32 [out, in], zeros where pruned
    damp_percent: float = 0.0
    loss: float = 0.0
    rel_error: float = 0.0

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def rows(self, start: int, stop: int) -> "PrunedWeight":
        return PrunedWeight(self.weight[start:stop], self.damp_percent, self.loss, self.rel_error)

    def cpu(self) -> "PrunedWeight":
        self.weight = self.weight.cpu()
        return self
