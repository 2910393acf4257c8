"""PRILoRA's math as pure functions: no Lightning, no hooks, no state.

Everything the callback decides goes through these functions, so it can be checked by hand on
small matrices (``tests/prilora/test_math.py``) and reused by people who drive peft themselves.

Source: Benedek & Wolf, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation", Findings of
EACL 2024 (arXiv 2401.11316). The two ideas are the paper's: ranks that grow linearly with depth,
and pruning of the LoRA ``A`` matrix by an importance that combines the weight magnitude with an
exponential moving average of the layer input's per-feature second moment. The sources available to
us do not give the paper's exact pruning schedule, so the schedule shapes here (cubic, from Zhu &
Gupta 2017, or linear) and every knob of them are our choices, named and documented.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ALPHA_POLICIES = ("scale", "constant")
SPARSITY_SCHEDULES = ("cubic", "linear")


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; half-up keeps the schedule symmetric about its mean.
    return int(math.floor(x + 0.5))


def rank_schedule(num_layers: int, r_start: int, r_end: int) -> List[int]:
    """Rank of each decoder layer, growing linearly from ``r_start`` (first) to ``r_end`` (last).

    ``r_l = round(r_start + (r_end - r_start) * l / (L - 1))`` (halves round up). With a single layer the
    mean ``(r_start + r_end) / 2`` is used. Because the line is symmetric about its midpoint, the ranks
    average to ``(r_start + r_end) / 2`` whenever that is an integer, so 4 -> 12 spends the same number
    of adapter parameters as a uniform rank 8 when all layers have the same shapes.
    """
    if num_layers < 1:
        raise ValueError(f"rank_schedule(num_layers={num_layers}): need at least one decoder layer.")
    if r_start < 1 or r_end < 1:
        raise ValueError(f"rank_schedule(r_start={r_start}, r_end={r_end}): ranks must be >= 1.")
    if r_start > r_end:
        raise ValueError(f"rank_schedule(r_start={r_start}, r_end={r_end}): PRILoRA ranks increase with depth; "
                         "need r_start <= r_end.")
    if num_layers == 1:
        return [_round_half_up((r_start + r_end) / 2)]
    step = (r_end - r_start) / (num_layers - 1)
    return [_round_half_up(r_start + step * layer) for layer in range(num_layers)]


def alpha_schedule(ranks: Sequence[int], policy: str, alpha: float, r_ref: float) -> List[float]:
    """LoRA alpha of each layer.

    ``"scale"`` keeps ``alpha / r`` equal to ``alpha / r_ref`` in every layer (``alpha_l = alpha * r_l / r_ref``),
    so each layer's update scaling matches a uniform rank-``r_ref`` LoRA with that alpha. ``"constant"`` keeps
    ``alpha`` itself, so the scaling ``alpha / r_l`` is larger in the shallow, low-rank layers.
    """
    if policy not in ALPHA_POLICIES:
        raise ValueError(f"alpha_policy={policy!r} is not one of {list(ALPHA_POLICIES)}.")
    if policy == "constant":
        return [float(alpha) for _ in ranks]
    return [float(alpha) * r / float(r_ref) for r in ranks]


def layer_key(layers_prefix: str, index: int) -> str:
    """peft ``rank_pattern`` key covering every module of decoder layer ``index``.

    peft matches a key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$", name)``, so the key is
    an escaped regex for ``<layers_prefix>.<index>.<anything>``.
    """
    return re.escape(f"{layers_prefix}.{index}.") + ".+"


def build_patterns(num_layers: int, r_start: int, r_end: int, alpha_policy: str = "scale",
                   alpha: float = 16.0, r_ref: float = 8.0,
                   layers_prefix: str = "model.layers") -> Tuple[Dict[str, int], Dict[str, float]]:
    """``(rank_pattern, alpha_pattern)`` for ``peft.LoraConfig``, one regex key per decoder layer.

    For users of plain peft::

        ranks, alphas = build_patterns(model.config.num_hidden_layers, 4, 12)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, rank_pattern=ranks, alpha_pattern=alphas, ...))

    ``layers_prefix`` is the module path of the decoder layer list inside the *base* model
    (``model.layers`` for Llama-style transformers models; see :func:`find_decoder_layers`).
    """
    ranks = rank_schedule(num_layers, r_start, r_end)
    alphas = alpha_schedule(ranks, alpha_policy, alpha, r_ref)
    keys = [layer_key(layers_prefix, i) for i in range(num_layers)]
    return dict(zip(keys, ranks)), dict(zip(keys, alphas))


def find_decoder_layers(model: torch.nn.Module) -> Tuple[str, int]:
    """``(prefix, count)`` of the decoder layer list: the longest ``nn.ModuleList`` whose name ends in
    ``layers``/``h``/``blocks`` (falls back to the longest ModuleList). Names are relative to ``model``."""
    best: Optional[Tuple[str, int]] = None
    fallback: Optional[Tuple[str, int]] = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if fallback is None or len(module) > fallback[1]:
            fallback = (name, len(module))
        if name.split(".")[-1] in ("layers", "h", "blocks") and (best is None or len(module) > best[1]):
            best = (name, len(module))
    found = best or fallback
    if found is None:
        raise ValueError(f"PRILoRA found no decoder layer list (nn.ModuleList) in {type(model).__name__}; "
                         "it needs a stack of decoder layers to grow ranks over.")
    return found


def layer_index(module_name: str, layers_prefix: str) -> Optional[int]:
    """Decoder layer index of ``module_name`` (a base-model or PeftModel name), or None outside the stack."""
    m = re.search(rf"(?:^|\.){re.escape(layers_prefix)}\.(\d+)\.", module_name)
    return int(m.group(1)) if m else None


def sparsity_at(step: int, final_sparsity: float, start_step: int, end_step: int, schedule: str = "cubic") -> float:
    """Target fraction of pruned entries per row of A at optimizer step ``step``.

    0 before ``start_step``, ``final_sparsity`` from ``end_step`` on, and in between with
    ``p = (step - start_step) / (end_step - start_step)``:

    - ``"cubic"``: ``final * (1 - (1 - p)^3)`` (Zhu & Gupta 2017; prunes fast early while many entries are
      redundant, slowly near the end so the adapter can recover);
    - ``"linear"``: ``final * p``.
    """
    if schedule not in SPARSITY_SCHEDULES:
        raise ValueError(f"sparsity_schedule={schedule!r} is not one of {list(SPARSITY_SCHEDULES)}.")
    if step < start_step:
        return 0.0
    if step >= end_step:
        return float(final_sparsity)
    p = (step - start_step) / (end_step - start_step)
    if schedule == "linear":
        return float(final_sparsity) * p
    return float(final_sparsity) * (1.0 - (1.0 - p) ** 3)


def is_pruning_step(step: int, start_step: int, end_step: int, interval: int) -> bool:
    """Prune at ``start_step + k * interval`` up to ``end_step``, and always at ``end_step`` itself (so the
    final sparsity is reached even when the interval does not divide the span)."""
    if step < start_step or step > end_step:
        return False
    return (step - start_step) % interval == 0 or step == end_step


def importance(a: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """``|A[i, j]| * sqrt(ema_j)`` for ``A`` of shape ``[r, in]`` and ``ema`` of shape ``[in]`` (computed in fp32).

    ``ema_j`` estimates ``E[x_j^2]`` of the input, so the product is the typical magnitude of the
    contribution ``A[i, j] * x_j`` to the i-th low-rank coordinate.
    """
    if a.dim() != 2 or ema.dim() != 1 or a.shape[1] != ema.shape[0]:
        raise ValueError(f"importance(): A must be [r, in] and ema [in]; got {tuple(a.shape)} and {tuple(ema.shape)}.")
    return a.detach().float().abs() * ema.detach().float().clamp_min(0).sqrt()


def prune_count(in_features: int, sparsity: float) -> int:
    """Entries to prune per row: ``floor(sparsity * in_features)``, never the whole row."""
    return min(int(math.floor(sparsity * in_features + 1e-9)), in_features - 1)


def update_mask(score: torch.Tensor, mask: torch.Tensor, sparsity: float, regrow: bool = False) -> torch.Tensor:
    """New keep-mask (bool, ``True`` = kept) with ``prune_count(in, sparsity)`` pruned entries in each row.

    ``score`` holds the importance of every entry (``[r, in]``). Without ``regrow`` the entries already
    pruned in ``mask`` stay pruned and the rest of each row's quota is taken from the least important
    kept entries; a row already past its quota is left as is (pruning never undoes itself). With
    ``regrow`` the mask is recomputed from scratch from ``score``, so a pruned entry whose score now
    beats a kept one comes back. Ties are broken by column index (stable sort), so equal inputs give
    equal masks on every DDP rank.
    """
    if score.shape != mask.shape or score.dim() != 2:
        raise ValueError(f"update_mask(): score {tuple(score.shape)} and mask {tuple(mask.shape)} "
                         "must be equal 2-D shapes.")
    rows, cols = score.shape
    k = prune_count(cols, sparsity)
    score = score.float()
    if not regrow:
        score = score.masked_fill(~mask, float("-inf"))
    order = torch.argsort(score, dim=1, stable=True)
    new = torch.ones_like(mask, dtype=torch.bool)
    if k > 0:
        new.scatter_(1, order[:, :k], False)
    if not regrow:
        new &= mask
    return new


def ema_update(ema: torch.Tensor, value: torch.Tensor, beta: float, first: bool) -> torch.Tensor:
    """``beta * ema + (1 - beta) * value``; the first observation initialises the average (no zero bias)."""
    return value.clone() if first else ema.mul(beta).add_(value, alpha=1.0 - beta)
