"""Token-level divergences between a teacher's and a student's next-token distributions.

Pure math, no Lightning. Every loss follows one convention:

- ``p`` is the teacher distribution ``softmax(teacher_logits / T)``, ``q`` the student's
  ``softmax(student_logits / T)``; the result is multiplied by ``T**2`` so that gradient magnitudes
  stay comparable across temperatures (Hinton et al., 2015).
- The divergence is summed over the vocabulary and averaged over the tokens whose label is not
  ``ignore_index`` (-100, the Hugging Face convention), so padding and prompt tokens never count.
- The maths runs in fp32 whatever the logits' dtype, but in chunks of ``chunk_size`` tokens. Each
  chunk is wrapped in activation checkpointing, so autograd keeps only the (views of the) input
  chunks and recomputes the fp32 intermediates in backward one chunk at a time: no full
  ``(batch x seq x vocab)`` fp32 copy of either logits tensor exists at once, in forward or backward.

Divergences (``p`` teacher, ``q`` student, ``KL(a||b) = sum a (log a - log b)``):

==================  ==========================================================================
``forward_kl``      ``KL(p||q)``, mean-seeking (classic KD)
``reverse_kl``      ``KL(q||p)``, mode-seeking (MiniLLM)
``jsd``             generalised JSD (GKD, Agarwal et al. 2024) with ``m = beta p + (1-beta) q``:
                    ``beta KL(p||m) + (1-beta) KL(q||m)``; ``beta=0.5`` is the Jensen-Shannon
                    divergence. As in GKD's reference code the end points are the scaled limits:
                    ``beta=0`` gives ``forward_kl`` and ``beta=1`` gives ``reverse_kl``.
``js``              ``jsd`` with ``beta=0.5``
``symmetric_kl``    ``KL(p||q) + KL(q||p)`` (Jeffreys divergence: the sum of ``jsd``'s end points)
``skew_kl``         skew forward KL (DistiLLM, Ko et al. 2024): ``KL(p || a p + (1-a) q)``
``skew_reverse_kl`` skew reverse KL (DistiLLM): ``KL(q || a q + (1-a) p)``, ``a = skew_alpha``
``tv``              total variation ``0.5 sum |p - q|``
==================  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd", "js", "symmetric_kl", "skew_kl", "skew_reverse_kl", "tv")


def check_loss_args(loss: str, temperature: float, beta: float = 0.5, skew_alpha: float = 0.1,
                    chunk_size: Optional[int] = None, where: str = "") -> None:
    """Validate loss arguments with errors that name the argument, the value and what is allowed."""
    w = f"{where}: " if where else ""
    if loss not in LOSSES:
        raise ValueError(f"{w}loss={loss!r} is not a known divergence; allowed: {list(LOSSES)}. "
                         "Hint: 'forward_kl' is classic KD, 'jsd' with beta interpolates forward/reverse KL.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{w}temperature={temperature!r} must be a finite number > 0 "
                         "(1.0 = the raw distributions; 2.0 softens them).")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"{w}beta={beta!r} must lie in [0, 1] (0 = forward KL, 0.5 = JS, 1 = reverse KL).")
    if not (isinstance(skew_alpha, (int, float)) and 0.0 <= skew_alpha < 1.0):
        raise ValueError(f"{w}skew_alpha={skew_alpha!r} must lie in [0, 1) (DistiLLM uses 0.1; 0 = plain KL).")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{w}chunk_size={chunk_size!r} must be a positive int (tokens per chunk) or None "
                         "for a single chunk.")


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) per row from log-probabilities; 0 * log 0 is taken as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) computed stably in log space (w strictly inside (0, 1))."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence_rows(loss: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5,
                    skew_alpha: float = 0.1) -> torch.Tensor:
    """Per-token divergence from student log-probs ``log_q`` and teacher log-probs ``log_p`` ([N, V] -> [N])."""
    if loss == "js":
        loss, beta = "jsd", 0.5
    if loss == "jsd":
        if beta == 0.0:
            loss = "forward_kl"
        elif beta == 1.0:
            loss = "reverse_kl"
    if loss == "forward_kl":
        return _kl_rows(log_p, log_q)
    if loss == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if loss == "symmetric_kl":
        return _kl_rows(log_p, log_q) + _kl_rows(log_q, log_p)
    if loss == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    if loss == "skew_kl":
        if skew_alpha == 0.0:
            return _kl_rows(log_p, log_q)
        return _kl_rows(log_p, _log_mix(log_p, log_q, skew_alpha))
    if loss == "skew_reverse_kl":
        if skew_alpha == 0.0:
            return _kl_rows(log_q, log_p)
        return _kl_rows(log_q, _log_mix(log_q, log_p, skew_alpha))
    if loss == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"loss={loss!r} is not a known divergence; allowed: {list(LOSSES)}.")


def _chunk_sum(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, loss: str, temperature: float,
               beta: float, skew_alpha: float) -> torch.Tensor:
    """Weighted sum of per-token divergences of one chunk, in fp32."""
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    return (divergence_rows(loss, log_q, log_p, beta, skew_alpha) * w).sum()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: Optional[torch.Tensor] = None, *, loss: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, skew_alpha: float = 0.1, chunk_size: Optional[int] = 1024,
                 ignore_index: int = IGNORE_INDEX, reduction: str = "mean", vocab_slice: bool = False) -> torch.Tensor:
    """Divergence between teacher and student logits, masked, temperature-scaled, in fp32 chunks.

    Args:
        student_logits: ``[..., V]`` (any float dtype; gradients flow into it).
        teacher_logits: ``[..., V]``, same shape; treated as a constant (detached).
        labels: ``[...]`` aligned with the logits' leading dims: position ``i`` counts unless
            ``labels[i] == ignore_index``. ``None`` counts every position. For causal LMs pass the
            labels shifted left by one (see ``shift_labels``), since logits at ``i`` predict token ``i+1``.
        chunk_size: tokens per fp32 chunk; ``None`` processes all tokens as one chunk.
        reduction: ``"mean"`` over counted tokens (0 if none counts), ``"sum"``, or ``"none"``
            (per-token values, masked positions 0; computed without chunk checkpointing).
        vocab_slice: when the vocab sizes differ, compare only the first ``min(V_s, V_t)`` entries
            (for models that share a tokenizer but pad their embedding differently). Each chunk is
            sliced on its own, so the full logits are never copied. Off: a size mismatch is an error.

    Returns the scalar loss (times ``temperature**2``).
    """
    check_loss_args(loss, temperature, beta, skew_alpha, chunk_size, where="distill_loss")
    same_lead = student_logits.shape[:-1] == teacher_logits.shape[:-1]
    if not same_lead or (student_logits.shape[-1] != teacher_logits.shape[-1] and not vocab_slice):
        raise ValueError(f"distill_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape. Hint: vocab sizes differ? "
                         "Slice both to a common vocabulary (DistillConfig.vocab_slice=True).")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"distill_loss: reduction={reduction!r}; allowed: ['mean', 'sum', 'none'].")
    s = student_logits.reshape(-1, student_logits.shape[-1])  # a view for contiguous logits: no copy
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    vocab = min(s.shape[-1], t.shape[-1])
    if labels is None:
        w = torch.ones(s.shape[0], device=s.device, dtype=torch.float32)
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"distill_loss: labels shape {tuple(labels.shape)} must equal the logits' leading "
                             f"shape {tuple(student_logits.shape[:-1])}.")
        w = (labels.reshape(-1) != ignore_index).to(torch.float32)
    scale = float(temperature) ** 2
    if reduction == "none":
        log_q = F.log_softmax(s[:, :vocab].float() / temperature, dim=-1)
        log_p = F.log_softmax(t[:, :vocab].float() / temperature, dim=-1)
        rows = divergence_rows(loss, log_q, log_p, beta, skew_alpha) * w * scale
        return rows.reshape(student_logits.shape[:-1])
    n = s.shape[0]
    step = n if chunk_size is None else chunk_size
    need_grad = torch.is_grad_enabled() and s.requires_grad
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, n, max(step, 1)):
        wi = w[i:i + step]
        if not bool(wi.any()):
            continue  # nothing counted here: skip the chunk's softmaxes entirely
        args = (s[i:i + step, :vocab], t[i:i + step, :vocab], wi, loss, float(temperature), float(beta), float(skew_alpha))
        if need_grad:
            total = total + checkpoint(_chunk_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_sum(*args)
    total = total * scale
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(1.0)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned to causal-LM logits: position ``i`` gets ``labels[i+1]``, the last gets ignore_index.

    Shifting the labels (not slicing ``logits[:, :-1]``) keeps the logits contiguous, so flattening
    them for chunking is a view rather than a full copy.
    """
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)
