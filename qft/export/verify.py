"""The last check before an export is renamed into place: the written files, loaded as a user loads
them, must compute roughly what the model did.

Lifecycle (every export: GPTQ, AWQ, RTN, pruned, W8A8, GGUF, layer-wise):

1. **reference**, before anything is changed: the model's log-probabilities on one check batch (the
   first calibration window, else ``CHECK_TEXT``) and each decoder block's output (``Reference``);
2. **load**: the checkpoint in its work directory, through the format's own loader and default dtype;
3. **compare** (``compare``): the logits must be finite, and ``KL(reference || written)`` must stay
   within the format's normal range. The KL is read against ``KL(reference || uniform)``, what a model
   that knows nothing scores, so one scale serves sharp and flat models alike (``kl_limit``);
4. **refuse** otherwise: ``ExportCheckError`` names the first module whose output is not finite, or the
   first block whose output diverges, and the directory is removed. Nothing broken reaches the file.

The limits (``kl_limit``) were set from measured exports (BENCHMARKS.md, export check): SmolLM2-135M's
normal exports stay 2-15x below them, and a checkpoint that predicts worse than knowing nothing is
refused whatever its format. It is a net for what no other check sees (a packing bug, a wrong dtype, a
model that no longer works: the Gemma exports that reached WikiText-2 perplexity 4e8), not a quality
gate: subtler damage, such as a wrong scale fold on a small model, is the fold check's to catch
(``qft.export.fold``), before anything is rounded.
"""
from __future__ import annotations

import math

import torch
from torch import nn

CHECK_TEXT = ("The history of the region begins with small farming villages along the river. Over the "
              "centuries, traders brought new crops, tools and ideas, and the villages grew into market towns. "
              "Today the valley is known for its orchards, its old stone bridges and a festival held every "
              "autumn, when families gather to share food, music and stories about the past.")
CHECK_TOKENS = 128


class ExportCheckError(RuntimeError):
    """The written checkpoint does not compute what the model did; ``nonfinite`` says whether its logits
    overflowed (a dtype problem: another dtype may do) or merely diverged (the quantization is broken)."""

    def __init__(self, message: str, nonfinite: bool, found: dict | None = None):
        super().__init__(message)
        self.nonfinite, self.found = nonfinite, found or {}


def kl_limit(bits: float, sparsity: float = 0.0) -> float:
    """The largest ``KL / KL_uniform`` a correct export of ``bits``-bit weights (pruned to ``sparsity``)
    may reach before it is refused. Measured on SmolLM2-135M (``benchmarks/export_check.py``): int8 RTN
    0.0006, W8A8 0.007, int4 g64 GPTQ 0.037 / AWQ 0.025 / RTN 0.071, GGUF Q4_K_M 0.004 / Q4_0 0.022, int3
    RTN 0.32, SparseGPT 50% 0.11 (with int4 0.15); int2 RTN 1.77, worse than a uniform guess, is refused."""
    limit = 0.1 if bits >= 8 else 0.3 if bits >= 4 else 0.6 if bits >= 3 else 1.0  # 2 bits: worse than uniform
    return max(limit, 0.6) if sparsity > 0 else limit


def check_tokens(tokens: torch.Tensor | None, tokenizer=None, vocab_size: int | None = None) -> torch.Tensor:
    """The check batch ``[1, n]``: the first calibration window, else ``CHECK_TEXT`` tokenized, else ids."""
    if tokens is not None:
        return tokens[:1, :CHECK_TOKENS].detach().cpu()
    if tokenizer is not None:
        ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids[:, :CHECK_TOKENS]
        if ids.numel():
            return ids
    return (torch.arange(1, CHECK_TOKENS + 1) % (vocab_size or 32000))[None]


def _blocks(model: nn.Module):
    from .blocks import find_decoder_blocks

    try:
        return find_decoder_blocks(model)
    except ValueError:
        return None, []


@torch.inference_mode()
def _run(model: nn.Module, tokens: torch.Tensor, watch_all: bool = False):
    """``(log-probs [n, V] fp32, [block outputs], first module with a non-finite output)``."""
    prefix, blocks = _blocks(model)
    outs: dict[int, torch.Tensor] = {}
    first = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(
        i, (o[0] if isinstance(o, (tuple, list)) else o).detach().float().cpu()[0])) for i, b in enumerate(blocks)]
    if watch_all:
        for name, m in model.named_modules():
            def look(mod, a, o, name=name):
                o = o[0] if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor) else o
                if not first and isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all():
                    first.append(name or type(mod).__name__)
            handles.append(m.register_forward_hook(look))
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=tokens.to(device), use_cache=False).logits.float().cpu()[0]
    finally:
        for h in handles:
            h.remove()
    return logits.log_softmax(-1), [outs[i] for i in sorted(outs)], (first[0] if first else None), prefix


class Reference:
    """The model's answer on the check batch, taken before the export changes anything."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        was = model.training
        model.eval()
        try:
            self.logprobs, self.blocks, _, self.prefix = _run(model, tokens)
        finally:
            model.train(was)
        self.tokens = tokens

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, blocks: list[torch.Tensor], tokens: torch.Tensor, prefix):
        ref = cls.__new__(cls)
        ref.logprobs, ref.blocks, ref.tokens, ref.prefix = logprobs, blocks, tokens, prefix
        return ref


def compare(model: nn.Module, ref: Reference) -> dict:
    """How far ``model`` is from ``ref`` on its batch: ``finite``, ``kl`` (mean over positions of
    ``KL(ref || model)``), ``kl_uniform`` (``KL(ref || uniform)``), their ratio, and per-block errors."""
    logprobs, blocks, first, prefix = _run(model, ref.tokens, watch_all=True)
    finite = bool(torch.isfinite(logprobs).all())
    p = ref.logprobs.exp()
    kl = float((p * (ref.logprobs - logprobs)).sum(-1).mean()) if finite else math.inf
    kl_uniform = float((p * (ref.logprobs + math.log(ref.logprobs.shape[-1]))).sum(-1).mean())
    errors = [float((b - r).norm() / r.norm().clamp_min(1e-30)) for b, r in zip(blocks, ref.blocks)]
    return {"finite": finite, "kl": kl, "kl_uniform": kl_uniform, "kl_ratio": kl / max(kl_uniform, 1e-9),
            "block_errors": errors, "first_nonfinite": first, "prefix": prefix or ref.prefix}


def diverging_block(errors: list[float], prefix) -> str | None:
    """The first block whose output error reaches half the largest: where most of the divergence begins."""
    finite = [e if math.isfinite(e) else math.inf for e in errors]
    if not finite:
        return None
    top = max(finite)
    i = next(i for i, e in enumerate(finite) if e >= top / 2)
    return f"{prefix}.{i}" if prefix else str(i)


def check_written(model: nn.Module, ref: Reference, limit: float, what: str, dtype: torch.dtype | None = None) -> dict:
    """``compare`` and refuse (``ExportCheckError``) a checkpoint whose logits are not finite or whose
    ``kl_ratio`` exceeds ``limit``; returns the comparison for the export summary."""
    got = compare(model, ref)
    dt = f" in {str(dtype).replace('torch.', '')}" if dtype is not None else ""
    summary = {k: got[k] for k in ("finite", "kl", "kl_uniform", "kl_ratio")}
    summary.update(limit=limit, tokens=int(ref.tokens.numel()))
    if not got["finite"]:
        where = got["first_nonfinite"] or diverging_block(got["block_errors"], got["prefix"])
        raise ExportCheckError(f"{what}: the written checkpoint, loaded{dt}, gives non-finite logits on the check "
                               f"batch; the first non-finite output is {where}'s. Activations beyond the dtype's range "
                               "(float16 ends at 65,504) are the usual cause: export with save_dtype='bfloat16' or "
                               "'float32'.", nonfinite=True, found=summary)
    if got["kl_ratio"] > limit:
        raise ExportCheckError(f"{what}: the written checkpoint, loaded{dt}, is far from the model it was exported "
                               f"from: KL {got['kl']:.3g} nats per token, {got['kl_ratio']:.2f}x what a uniform guess "
                               f"scores (the format's normal range ends at {limit}x). Its outputs first diverge at "
                               f"{diverging_block(got['block_errors'], got['prefix'])}. Nothing was written. More "
                               "bits, a smaller group, or a calibrated method (GPTQ, AWQ) keep a model closer.",
                               nonfinite=False, found=summary)
    return summary
