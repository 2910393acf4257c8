"""Token-level divergences between a teacher's and a student's next-token distributions.

Pure math, no Lightning. Every loss follows one convention:

- ``p`` is the teacher distribution ``softmax(teacher_logits / T)``, ``q`` the student's
  ``softmax(student_logits / T)``; the result is multiplied by ``T**2`` so that gradient magnitudes
  stay comparable across temperatures (Hinton et al., 2015).
- The divergence is summed over the vocabulary and averaged over the tokens whose label is not
  ``ignore_index`` (-100, the Hugging Face convention), so padding and prompt tokens never count.
- The maths runs in fp32 whatever the logits' dtype, but in chunks of ``chunk_size`` tokens: each
  chunk's fp32 softmaxes are built, differentiated (the gradient w.r.t. the student logits is
  computed right there, see ``_ChunkedKDLoss``) and freed before the next chunk, so no full
  ``(batch x seq x vocab)`` fp32 copy of either logits tensor exists at once, in forward or backward.
- ``kd_ce_loss`` computes ``(1 - kd_ratio) * CE + kd_ratio * KD`` in that same single pass.

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
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

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


class _Opts(NamedTuple):
    loss: str
    temperature: float
    beta: float
    skew_alpha: float
    vocab: int          # compare the first ``vocab`` logits (vocab_slice)
    kd_weight: float    # multiplies the chunk's summed divergence (T^2 and the mean's 1/n folded in)
    ce_weight: float    # multiplies the chunk's summed cross-entropy
    want_ce: bool       # compute the CE value (for logging) even when ce_weight is 0
    step: int           # tokens per chunk


def _chunk_terms(s, t, labels, w, o: _Opts):
    """(objective, ce_sum, kd_sum) of one chunk, in fp32; ``s`` may be a grad-requiring leaf."""
    sk = s[:, : o.vocab] if o.vocab < s.shape[-1] else s
    log_q = F.log_softmax(sk.float() / o.temperature, dim=-1)
    log_p = F.log_softmax(t[:, : o.vocab].float() / o.temperature, dim=-1)
    kd = (divergence_rows(o.loss, log_q, log_p, o.beta, o.skew_alpha) * w).sum()
    ce = kd.new_zeros(())
    if o.want_ce or o.ce_weight:
        log_q1 = log_q if (o.temperature == 1.0 and sk is s) else F.log_softmax(s.float(), dim=-1)
        ce = -(log_q1.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * w).sum()
    return o.kd_weight * kd + o.ce_weight * ce, ce, kd


class _ChunkedKDLoss(torch.autograd.Function):
    """Chunked KD (+ CE) whose gradient is computed chunk by chunk during forward.

    Why not autograd over the chunks: slicing a chunk out of the logits makes its backward build a
    full-size zero gradient per chunk, and autograd keeps every chunk's fp32 intermediates until
    backward. Here each chunk's fp32 work is done and freed inside forward, and its gradient is
    written into one buffer shaped like the logits (their dtype); backward only scales that buffer.
    So the peak is the logits, one gradient-sized buffer and one chunk of fp32 temporaries.
    """

    @staticmethod
    def forward(ctx, s, t, labels, w, o: _Opts):
        need = ctx.needs_input_grad[0]
        grad = torch.zeros_like(s) if need else None
        obj = torch.zeros((), dtype=torch.float32, device=s.device)
        ce_sum, kd_sum = obj.clone(), obj.clone()
        with torch.autocast(s.device.type, enabled=False):
            for i in range(0, s.shape[0], o.step):
                wi = w[i:i + o.step]
                if not bool(wi.any()):
                    continue  # nothing counted here: zero gradient, no softmax
                sc, args = s[i:i + o.step], (t[i:i + o.step], labels[i:i + o.step], wi, o)
                if need:
                    with torch.enable_grad():
                        leaf = sc.detach().requires_grad_()
                        val, ce, kd = _chunk_terms(leaf, *args)
                        (g,) = torch.autograd.grad(val, leaf)
                    grad[i:i + o.step].copy_(g)
                    del g
                else:
                    val, ce, kd = _chunk_terms(sc, *args)
                obj += val.detach()
                ce_sum += ce.detach()
                kd_sum += kd.detach()
        if need:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return obj, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_obj, g_ce, g_kd):
        (grad,) = ctx.saved_tensors
        if bool(g_obj == 1):  # the usual case (the loss itself is backpropagated): no second buffer
            return grad, None, None, None, None
        return grad * g_obj.to(grad.dtype), None, None, None, None


def _prepare(student_logits, teacher_logits, labels, loss, temperature, beta, skew_alpha, chunk_size,
             vocab_slice, ignore_index, where):
    check_loss_args(loss, temperature, beta, skew_alpha, chunk_size, where=where)
    same_lead = student_logits.shape[:-1] == teacher_logits.shape[:-1]
    if not same_lead or (student_logits.shape[-1] != teacher_logits.shape[-1] and not vocab_slice):
        raise ValueError(f"{where}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape. Hint: vocab sizes differ? "
                         "Slice both to a common vocabulary (DistillConfig.vocab_slice=True).")
    s = student_logits.reshape(-1, student_logits.shape[-1])  # a view for contiguous logits: no copy
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    if labels is None:
        lab = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"{where}: labels shape {tuple(labels.shape)} must equal the logits' leading "
                             f"shape {tuple(student_logits.shape[:-1])}.")
        lab = labels.reshape(-1).to(s.device)
    w = (lab != ignore_index).to(torch.float32) if labels is not None else torch.ones(s.shape[0], device=s.device)
    return s, t, lab, w, min(s.shape[-1], t.shape[-1])


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
            (per-token values, masked positions 0; computed in one piece, for analysis).
        vocab_slice: when the vocab sizes differ, compare only the first ``min(V_s, V_t)`` entries
            (for models that share a tokenizer but pad their embedding differently). Each chunk is
            sliced on its own, so the full logits are never copied. Off: a size mismatch is an error.

    Returns the scalar loss (times ``temperature**2``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"distill_loss: reduction={reduction!r}; allowed: ['mean', 'sum', 'none'].")
    s, t, lab, w, vocab = _prepare(student_logits, teacher_logits, labels, loss, temperature, beta, skew_alpha,
                                   chunk_size, vocab_slice, ignore_index, "distill_loss")
    scale = float(temperature) ** 2
    if reduction == "none":
        log_q = F.log_softmax(s[:, :vocab].float() / temperature, dim=-1)
        log_p = F.log_softmax(t[:, :vocab].float() / temperature, dim=-1)
        rows = divergence_rows(loss, log_q, log_p, beta, skew_alpha) * w * scale
        return rows.reshape(student_logits.shape[:-1])
    n = float(w.sum().clamp_min(1.0)) if reduction == "mean" else 1.0
    o = _Opts(loss, float(temperature), float(beta), float(skew_alpha), vocab, scale / n, 0.0, False,
              chunk_size or max(1, s.shape[0]))
    return _ChunkedKDLoss.apply(s, t, lab, w, o)[0]


def kd_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               kd_ratio: float, *, loss: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
               skew_alpha: float = 0.1, chunk_size: Optional[int] = 1024, ignore_index: int = IGNORE_INDEX,
               vocab_slice: bool = False):
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` in one chunked fp32 pass over the logits.

    ``labels`` are the targets aligned with the logits (``shift_labels`` for causal LMs); CE is the
    token-mean cross-entropy over the student's full vocabulary (Hugging Face's causal-LM loss), KD is
    ``distill_loss`` with the same arguments. Computing both in one pass means no full fp32 copy of
    the logits is made for CE either (Hugging Face's loss upcasts the whole tensor).

    Returns ``(loss, ce, kd)``; only ``loss`` carries gradient.
    """
    if not (isinstance(kd_ratio, (int, float)) and 0.0 <= kd_ratio <= 1.0):
        raise ValueError(f"kd_ce_loss: kd_ratio={kd_ratio!r} must lie in [0, 1].")
    s, t, lab, w, vocab = _prepare(student_logits, teacher_logits, labels, loss, temperature, beta, skew_alpha,
                                   chunk_size, vocab_slice, ignore_index, "kd_ce_loss")
    n = float(w.sum().clamp_min(1.0))
    o = _Opts(loss, float(temperature), float(beta), float(skew_alpha), vocab,
              kd_ratio * float(temperature) ** 2 / n, (1.0 - kd_ratio) / n, True, chunk_size or max(1, s.shape[0]))
    obj, ce, kd = _ChunkedKDLoss.apply(s, t, lab, w, o)
    return obj, ce / n, kd * float(temperature) ** 2 / n


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels aligned to causal-LM logits: position ``i`` gets ``labels[i+1]``, the last gets ignore_index.

    Shifting the labels (not slicing ``logits[:, :-1]``) keeps the logits contiguous, so flattening
    them for chunking is a view rather than a full copy.
    """
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)
