"""Hidden-state distillation: match chosen student layers to teacher layers with MSE or cosine.

Why a module rather than a function: when the widths differ the student's states go through a
learned linear projection per mapped pair, and those weights must train (and be checkpointed) with
the student. The ``DistillationModule`` holds one ``HiddenStateLoss`` as a submodule, so its
projections appear in ``named_parameters()`` and the optimizer picks them up.

Indices follow Hugging Face ``output_hidden_states``: index 0 is the embedding output and index
``L`` the output of the last layer (for Llama, after the final norm).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_LOSSES = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[list[int]]:
    """Map each student layer ``i`` (1..L_s) to teacher layer ``round(i * L_t / L_s)``.

    The last layers always meet, and a student as deep as the teacher maps one to one.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"uniform_layer_map(student_layers={student_layers}, teacher_layers={teacher_layers}): "
                         "both must be >= 1.")
    return [[i, int(round(i * teacher_layers / student_layers))] for i in range(1, student_layers + 1)]


class HiddenStateLoss(nn.Module):
    """Mean over mapped layer pairs of a per-token MSE or (1 - cosine) between hidden states.

    Args:
        student_layers, teacher_layers: number of decoder layers (valid indices are 0..L).
        student_dim, teacher_dim: hidden widths.
        loss: ``mse`` (mean squared error per feature) or ``cosine`` (1 - cosine similarity).
        layer_map: ``[[student_index, teacher_index], ...]``; ``None`` = ``uniform_layer_map``.
        projection: learn a bias-free ``Linear(student_dim, teacher_dim)`` per pair where the widths
            differ, initialised to a (scaled) truncated identity; ``False`` makes a width mismatch an error.
    """

    def __init__(self, student_layers: int, teacher_layers: int, student_dim: int, teacher_dim: int,
                 loss: str = "mse", layer_map: Optional[Sequence[Sequence[int]]] = None, projection: bool = True):
        super().__init__()
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"HiddenStateLoss(loss={loss!r}): allowed: {list(HIDDEN_LOSSES)}.")
        pairs = [list(p) for p in (layer_map if layer_map is not None else
                                   uniform_layer_map(student_layers, teacher_layers))]
        for s, t in pairs:
            if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
                raise ValueError(f"HiddenStateLoss(layer_map=...): pair [{s}, {t}] is out of range; student "
                                 f"indices are 0..{student_layers}, teacher indices 0..{teacher_layers} "
                                 "(0 = embeddings).")
        if student_dim != teacher_dim and not projection:
            raise ValueError(f"HiddenStateLoss(projection=False): student width {student_dim} differs from teacher "
                             f"width {teacher_dim}. Hint: set hidden_projection=True to learn a linear map.")
        self.loss = loss
        self.pairs = pairs
        self.proj = None
        if student_dim != teacher_dim:
            self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in pairs)
            with torch.no_grad():
                for lin in self.proj:
                    lin.weight.zero_()
                    k = min(student_dim, teacher_dim)
                    lin.weight[:k, :k] = torch.eye(k)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``student_hidden``/``teacher_hidden``: tuples of ``[B, T, D]``; ``mask``: ``[B, T]`` (1 = counts)."""
        total = None
        for k, (si, ti) in enumerate(self.pairs):
            hs = student_hidden[si]
            if self.proj is not None:
                hs = self.proj[k](hs.to(self.proj[k].weight.dtype))
            hs = hs.float()
            ht = teacher_hidden[ti].detach().to(hs.device, torch.float32)
            if self.loss == "mse":
                per_tok = (hs - ht).pow(2).mean(-1)
            else:
                per_tok = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-6)
            if mask is not None:
                m = mask.to(per_tok.dtype)
                val = (per_tok * m).sum() / m.sum().clamp_min(1.0)
            else:
                val = per_tok.mean()
            total = val if total is None else total + val
        return total / len(self.pairs)
