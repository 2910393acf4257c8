"""Block-by-block GPTQ over a decoder: cached block inputs, Hessians through hooks, true-sequential.

Only one decoder block (plus the embeddings, for the first pass) is ever on the compute device: the
calibration set's block inputs are cached there, each block is moved in, quantized, run once more to
produce the next block's inputs, and moved back. So a model larger than the accelerator still exports.

Within a block, linear layers that read the same input tensor (q/k/v; gate/up) share one Hessian and
are solved as one tall matrix (GPTQ's rows are independent given H). With ``true_sequential`` the
groups are quantized in execution order, each one's Hessian collected from inputs that already passed
through the quantized layers before it; the forward is cut short (an exception from a pre-hook) as soon
as the last layer of the group is reached, so early groups cost only a fraction of a block forward.
The grouping is discovered by running one batch with hooks, not hard-coded per architecture.

Nothing is computed twice that need not be. Once a sub-module of the block is final (its weights are
quantized and everything before it is too), later stages replay it: as its last linear applied to the
inputs saved while that linear was calibrated, when its output is that linear's (Llama's attention is
``o_proj(...)``, so attention runs once per block, not three times), or else as its saved outputs. And
the next block's inputs come from the last stage's forward plus a correction (see ``_tail_matches``).
Measured on SmolLM2-135M with 128 x 512 calibration tokens, bf16, 2 CPU cores: the whole export takes
about 1.5x one plain forward of the model over the calibration set (BENCHMARKS.md).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qft import memory

from .blocks import (
    block_linears,
    check_model,
    child_endings,
    discover_groups,
    final_children,
    find_decoder_blocks,
    replaying,
    run_block,
    slice_kwargs,
)
from .config import GPTQConfig
from .gptq import (
    HessianAccumulator,
    QuantizedWeight,
    damped_inverse_cholesky,
    direct_output_error,
    gptq_solve,
    params_for_groups,
    relative_output_error,
    rtn_solve,
)
from .offload import Offload, check_offload
from .prune import PrunedWeight, magnitude_mask, sparsity_of, wanda_mask


class _StopForward(Exception):
    """Raised from a hook to end a forward early; never escapes this module."""


@contextmanager
def _on_device(params_and_buffers, device):
    """Temporarily move tensors (not modules: the blocks stay where they are) to ``device``."""
    moved = []
    for t in params_and_buffers:
        if t.device != torch.device(device):
            moved.append((t, t.data))
            t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, old in moved:
            t.data = old


def _outside_blocks(model, prefix):
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not n.startswith(prefix + "."):
            yield p


@torch.inference_mode()
def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int, device, offload: Offload | None = None):
    """Run the embeddings once per batch and keep what the first block receives: ``(hidden, kwargs)`` per
    batch, in a ``BlockInputs`` that keeps the hidden states where ``offload`` says."""
    prefix, blocks = find_decoder_blocks(model)
    cache = (offload or Offload("none", device)).inputs()

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache.append(hidden, {**kwargs, **({"_args": args[1:]} if len(args) > 1 else {})})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _on_device(_outside_blocks(model, prefix), device):
            for b in tokens.split(batch_size):
                try:
                    model(input_ids=b.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return cache


REPORT_TOKENS = 2048  # calibration tokens per layer for the report's direct output error

@torch.no_grad()
def quantize_model(model: nn.Module, cfg: GPTQConfig, tokens: torch.Tensor | None = None, device=None,
                   batch_size: int = 16, progress: bool = True, reuse_outputs: bool = True,
                   fixed: dict[str, QuantizedWeight] | None = None, refine: bool = False,
                   anchor: dict[str, torch.Tensor] | None = None, anchor_rows: int = 0,
                   load_block=None, release_block=None, calibration_offload: str = "none", offload_dir=None,
                   keep_zeros: bool = False, grid_for=None):
    """Quantize every linear layer in the decoder blocks of ``model`` (lm_head stays full precision).

    Returns ``(quantized, rows)``: ``{qualified layer name: QuantizedWeight}`` and per-layer report rows.
    The model's linear weights are overwritten with their dequantized values (so the model can be
    evaluated as is); the integer codes are what ``save_quantized`` packs. ``reuse_outputs`` replays
    the saved outputs of a block's sub-modules once they are final (Llama's attention, in the MLP stages
    of true-sequential) instead of recomputing them; the results are the same either way.

    ``fixed`` maps qualified layer names to grids chosen before (what QAT learned, ``qft.layers.grids``):
    those layers are written as given, with no solve, or with ``refine`` GPTQ re-solves their codes
    inside the given scales and zeros, toward the given grid's own weights (the model QAT trained) on
    task windows and toward the anchor on general ones (without an anchor that is the given grid again).
    The other layers are solved as usual, on inputs that went through the fixed ones. When every layer
    is fixed and nothing is refined, no calibration forward runs at all.

    ``anchor`` (``{qualified layer name: fp32 weight}``) with ``anchor_rows`` > 0 says that the last
    ``anchor_rows`` calibration sequences (general text) should come out as the anchor weights compute
    them, the others as ``model`` computes them. Each solve then targets the least-squares blend
    ``W* = (W H_task + W_anchor H_general) (H_task + H_general)^-1`` under ``H = H_task + H_general``
    (token-weighted): ``||(Q - W) X_task||^2 + ||(Q - W_anchor) X_general||^2`` is what GPTQ minimises.
    With the base model's weights as the anchor, a fine-tune keeps its task behaviour and the export
    keeps the base's general ability where the two inputs differ (``qft.export.pipeline``'s
    ``general_target="base"``).

    ``load_block(i, block)`` and ``release_block(i, block, quantized_of_block)`` (both or neither) let the
    blocks live elsewhere (``qft.export.layerwise``: on disk, the skeleton on the meta device): each block
    is loaded just before it is processed and released right after, with its quantized layers, which
    then leave the returned ``quantized``.

    ``calibration_offload`` (``"none"``, ``"cpu"``, ``"disk"``; ``qft.export.offload``) says where the cached
    calibration activations wait between uses: on the compute device, in host memory, or in temporary
    files (under ``offload_dir``, else the system's temporary directory). The results are the same.

    ``keep_zeros``: the model was pruned before (``qft.sparsity``): each weight's exact zeros are a fixed
    mask that rounding keeps (the zero point's code), unless ``cfg`` prunes anew.

    ``grid_for(name, W, H)`` chooses each layer's grid from its weight and its inputs' Hessian (None on
    the data-free road, ``cfg.method="rtn"``), as a ``QuantizedWeight`` with the grid's own rounding
    (``qft.export.gguf``: a GGUF block format per layer). With ``refine`` GPTQ solves the codes inside
    that grid toward the layer's weight, else the grid's codes are written. Layers that share an input
    are then solved one by one (a q/k/v may mix formats) on the one Hessian.
    """
    from tqdm.auto import tqdm

    check_model(model, cfg)
    check_offload(calibration_offload)
    prefix, blocks = find_decoder_blocks(model)
    device = torch.device(device or next(model.parameters()).device)
    n_layers = sum(len(block_linears(b)) for b in blocks)
    bar = tqdm(total=n_layers, desc=f"{cfg.method.upper()} {cfg.bits}-bit", unit="layer", disable=not progress)
    quantized: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []

    fixed = fixed or {}
    given_label, awq_of = "qat", {}
    if cfg.awq:  # AWQ's scales are folded into the model first (qft.export.awq); "awq" also rounds there
        if fixed:
            raise ValueError(f"quantize_model(method={cfg.method!r}): AWQ rescales weights, so it cannot keep the "
                             f"{len(fixed)} fixed grids given (QAT's); export them with method='gptq' or 'rtn', or "
                             "solve a new grid (qat_grid='resolve').")
        if tokens is None:
            raise ValueError(f"quantize_model(method={cfg.method!r}) needs calibration tokens (AWQ's scales are "
                             "searched on activations); see qft.export.calibration.")
        from .awq import awq_prepass

        fixed, awq_rows = awq_prepass(model, cfg, tokens, device, batch_size, progress=progress)
        given_label = "awq"
        awq_of = {f"{prefix}.{r['block']}.{n}": {"awq_alpha": r["alpha"], "awq_error_ratio": r["error_ratio"],
                                                  "awq_max_scale": r["max_scale"],
                                                  **({"awq_fold_refused": r["fold_refused"]} if r["fold_refused"]
                                                     else {})}
                  for r in awq_rows for n in r["layers"].split(",")}

    if grid_for is not None and (fixed or cfg.awq or cfg.pruning or anchor):
        raise ValueError("quantize_model(grid_for=...) chooses every layer's grid itself: it does not combine "
                         "with fixed grids, AWQ, pruning or an anchor.")
    if cfg.pruning and fixed:
        raise ValueError(f"quantize_model(sparsity={cfg.sparsity}): pruning changes weights, so it cannot keep the "
                         f"{len(fixed)} fixed grids given (QAT's); prune with qat_grid='resolve'.")

    def commit(i, names, lin_map, qw: QuantizedWeight, seconds, n_tokens, X=None, method=cfg.method):
        start = 0
        for n in names:
            lin = lin_map[n]
            part = qw.rows(start, start + lin.out_features)
            start += lin.out_features
            full = f"{prefix}.{i}.{n}"
            quantized[full] = part
            deq = part.dequantize().to(lin.weight.device)
            # per layer, directly on a sample of its calibration inputs, so it cannot go negative as the
            # quadratic form of a bf16-accumulated Hessian can (RTN has none: the relative weight error)
            part.rel_error = (direct_output_error(lin.weight, deq, X) if X is not None else
                              relative_output_error(lin.weight, deq, torch.eye(lin.in_features, device=deq.device)))
            lin.weight.copy_(deq.to(lin.weight))
            rows.append(dict(layer=full, block=i, in_features=lin.in_features, out_features=lin.out_features,
                             shared_with=",".join(x for x in names if x != n), method=method,
                             bits=getattr(part, "bits", cfg.bits),
                             group_size=getattr(part, "group_size", cfg.group_size), damp_percent=qw.damp_percent,
                             n_tokens=n_tokens,
                             gptq_loss=qw.loss, rel_output_error=part.rel_error, seconds=round(seconds, 4),
                             **awq_of.get(full, {}),
                             **({"prune_method": cfg.prune_method, "sparsity": sparsity_of(deq)} if cfg.pruning
                                else {})))
            bar.update(1)

    every_fixed = all(f"{prefix}.{i}.{n}" in fixed for i, b in enumerate(blocks) for n in block_linears(b))
    no_data = cfg.method == "rtn" or cfg.method == "none" and cfg.prune_method == "magnitude"
    if no_data or (every_fixed and not refine):  # no calibration forward needed
        for i, block in enumerate(blocks):
            if load_block is not None:
                load_block(i, block)
            lins = block_linears(block)
            for n, lin in lins.items():
                t0 = time.perf_counter()
                given = fixed.get(f"{prefix}.{i}.{n}")
                qw = given if given is not None else grid_for(f"{prefix}.{i}.{n}", lin.weight.to(device), None) \
                    if grid_for is not None else _data_free(lin.weight.to(device), cfg, keep_zeros)
                commit(i, [n], lins, qw.cpu(), time.perf_counter() - t0, 0,
                       method=given_label if given else cfg.method)
            _release(release_block, quantized, prefix, i, block)
        bar.close()
        return quantized, rows

    if tokens is None:
        raise ValueError("quantize_model(method='gptq') needs calibration tokens; see qft.export.calibration.")
    if anchor_rows and not anchor:
        raise ValueError("quantize_model(anchor_rows=...) needs the anchor weights (anchor=...).")
    n_task = tokens.shape[0] - anchor_rows if anchor else tokens.shape[0]
    if anchor and not 0 < anchor_rows < tokens.shape[0]:
        raise ValueError(f"quantize_model(anchor_rows={anchor_rows}): needs general and task rows among the "
                         f"{tokens.shape[0]} calibration sequences.")
    offload = Offload(calibration_offload, device, offload_dir)  # its files go with it (qft.export.offload)
    cache = capture_block_inputs(model, tokens[:n_task], batch_size, device, offload)
    split = len(cache) if anchor else None  # batches from here on are general text
    if anchor:
        cache.extend(capture_block_inputs(model, tokens[n_task:], batch_size, device, offload))
    groups = None
    sample_stride = max(1, tokens.numel() // REPORT_TOKENS)  # a token sample for the report's errors
    low_precision = _low_precision(cfg, cache)  # same activations dtype in every block
    for i, block in enumerate(blocks):
        bar.set_postfix_str(f"block {i + 1}/{len(blocks)}")
        if load_block is not None:
            load_block(i, block)
        home = next(block.parameters()).device
        block.to(device)
        lins = block_linears(block)
        if groups is None:
            groups = discover_groups(block, *cache[0])
            endings = child_endings(block, *cache[0]) if reuse_outputs else {}
        stages = [[g] for g in groups] if cfg.true_sequential else [groups]
        final_after = final_children(stages) if reuse_outputs else {}
        saved: dict[str, list] = {}  # outputs of children whose weights and inputs are final
        next_cache = None
        for si, stage in enumerate(stages):
            # The last stage of a true-sequential block is usually one linear layer whose output is added
            # to the block output (Llama's down_proj). Then the block need not be run again afterwards:
            # next input = output with the old weight + x @ (W_q - W)^T, checked on one batch below.
            tail = cfg.true_sequential and si == len(stages) - 1 and len(stage[0]) == 1 and i + 1 < len(blocks)
            # children final after this stage whose output is a linear's: keep that linear's inputs
            ending = {c: endings[c] for c, last in final_after.items()
                      if last == si < len(stages) - 1 and c in endings}
            capture = [c for c, last in final_after.items() if last == si - 1 and c not in saved]
            stage_out = _collect_stage(block, lins, stage, cache, device, keep=tail, replay=saved, capture=capture,
                                       low_precision=low_precision, split=split,
                                       keep_inputs=[_group_head(stage, lin) for lin, _ in ending.values()],
                                       sample_stride=sample_stride, offload=offload)
            accs, fwd_s, outs, tail_inputs, captured, kept, samples = stage_out
            saved.update({c: o for c, o in captured.items() if len(o) == len(cache)})
            for g in stage:
                t1 = time.perf_counter()
                old = lins[g[0]].weight.detach().clone() if tail else None
                H = accs[g[0]].hessian()
                blend = accs[g[0]].blend if split is not None else None
                held = [n for n in g if f"{prefix}.{i}.{n}" in fixed]
                free = [n for n in g if n not in held]
                if grid_for is not None:  # one layer at a time, each in its own grid
                    for n in free:
                        W = lins[n].weight
                        qw = grid_for(f"{prefix}.{i}.{n}", W, H)
                        qw = _solve(W, H, cfg, qw, keep_zeros) if refine else qw
                        commit(i, [n], lins, qw.cpu(), time.perf_counter() - t1 + fwd_s / len(stage),
                               accs[g[0]].n_tokens, torch.cat(samples[g[0]]), method=cfg.method if refine else "grid")
                    free = []
                for names, given in ((held, True), (free, False)):
                    if not names:
                        continue
                    grid = QuantizedWeight.cat([fixed[f"{prefix}.{i}.{n}"] for n in names]) if given else None
                    if given and not refine:
                        qw, method = grid, "qat"
                    else:
                        # the target on task windows: what was trained (a learned grid is the trained model)
                        W = grid.dequantize() if given else torch.cat([lins[n].weight for n in names], 0)
                        keep_grid = (grid.scale, grid.zero) if given else None
                        if blend is not None:
                            if keep_grid is None:  # fit the grid to the model's weight: a blend may carry outliers
                                keep_grid = params_for_groups(W.float(), cfg)
                            W = blend(W, torch.cat([anchor[f"{prefix}.{i}.{n}"] for n in names], 0), cfg)
                        qw = _solve(W, H, cfg, keep_grid, keep_zeros)
                        method = "qat+gptq" if given else cfg.method
                    commit(i, names, lins, qw.cpu(), time.perf_counter() - t1 + fwd_s / len(stage),
                           accs[g[0]].n_tokens, torch.cat(samples[g[0]]), method=method)
            for c, (lin, n_out) in ending.items():  # now final: replay as quantized linear(saved input)
                xs = kept[_group_head(stage, lin)]
                if len(xs) == len(cache):
                    saved[c] = offload.stash()
                    with torch.inference_mode():
                        for x in xs:
                            y = lins[lin](x)
                            saved[c].append((y,) + (None,) * (n_out - 1) if n_out else y)
            del kept
            if tail:
                delta = lins[stage[0][0]].weight - old
                next_cache = offload.inputs()
                with torch.inference_mode():
                    for b, (o, x) in enumerate(zip(outs, tail_inputs)):
                        next_cache.append(o + F.linear(x, delta), cache.kwargs[b])
                if not _tail_matches(block, cache[0], next_cache[0][0]):
                    next_cache = None
            del accs, outs, tail_inputs
        del saved
        if i + 1 < len(blocks):
            if next_cache is None:
                next_cache = offload.inputs()
                with torch.inference_mode():
                    for hidden, kw in cache:
                        next_cache.append(run_block(block, hidden, kw), kw)
            cache = next_cache
        block.to(home)
        _release(release_block, quantized, prefix, i, block)
        memory.trim()  # this block's activations and Hessians, back to the OS (qft.memory)
    bar.close()
    return quantized, rows


def _data_free(W: torch.Tensor, cfg: GPTQConfig, keep_zeros: bool = False):
    """A layer's weight without calibration data: RTN, after magnitude pruning if asked."""
    mask = magnitude_mask(W, cfg.sparsity, cfg.sparsity_pattern) if cfg.pruning else \
        (W == 0 if keep_zeros else None)
    if cfg.method == "none":
        return PrunedWeight(W.detach().float().masked_fill(mask, 0.0))
    return rtn_solve(W, cfg, mask=mask)


def _solve(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, keep_grid=None, keep_zeros: bool = False):
    """One group's solve from its Hessian: GPTQ (SparseGPT choosing its zeros inside when pruning), or
    after a magnitude or Wanda mask; pruned without rounding (``method="none"``), Wanda and magnitude
    leave the kept weights as they are (their papers' procedure), SparseGPT updates them."""
    mask = None
    if cfg.pruning and cfg.prune_method == "magnitude":
        mask = magnitude_mask(W, cfg.sparsity, cfg.sparsity_pattern)
    elif cfg.pruning and cfg.prune_method == "wanda":
        mask = wanda_mask(W, torch.diag(H), cfg.sparsity, cfg.sparsity_pattern)
    elif keep_zeros and not cfg.pruning:
        mask = W == 0
    if cfg.method == "none" and mask is not None:
        return PrunedWeight(W.detach().float().masked_fill(mask, 0.0))
    return gptq_solve(W, H, cfg, report_error=False, grid=keep_grid, mask=mask)


def _release(release_block, quantized: dict, prefix: str, i: int, block) -> None:
    if release_block is not None:
        mine = [k for k in quantized if k.startswith(f"{prefix}.{i}.")]
        release_block(i, block, {k: quantized.pop(k) for k in mine})


def _low_precision(cfg: GPTQConfig, cache) -> bool:
    if cfg.hessian_dtype == "auto":
        return cache[0][0].dtype == torch.bfloat16
    return cfg.hessian_dtype == "bfloat16"


def _group_head(stage, linear: str) -> str:
    """The first layer of ``linear``'s group in ``stage`` (where its shared input is seen)."""
    return next(g[0] for g in stage if linear in g)


def _collect_stage(block, lins, stage, cache, device, keep=False, replay=None, capture=(), low_precision=False,
                   keep_inputs=(), split=None, sample_stride=1, offload: Offload | None = None):
    """Run the cached inputs through ``block`` to accumulate the Hessians of ``stage``'s groups.

    Without ``keep`` the forward stops at the pre-hook of the last group's first layer (its input is all
    the group needs). With ``keep`` it runs to the end and returns the outputs and that layer's inputs.
    Children named in ``replay`` return their saved outputs instead of running; those in ``capture``
    have their outputs saved (complete only if the forward got past them); the layers in ``keep_inputs``
    (group heads of this stage) have their inputs saved. With ``split``, batches from that index on are
    general text and get Hessians of their own (``SplitHessian``). Every ``sample_stride``-th input token
    of each group is kept in fp32 (``samples``), for the report's direct output error.
    """
    t0 = time.perf_counter()
    source = [0]  # which part of the calibration set the current batch is from
    make = (lambda n: HessianAccumulator(n, device, low_precision)) if split is None else \
        (lambda n: SplitHessian(n, device, low_precision, source))
    accs = {g[0]: make(lins[g[0]].in_features) for g in stage}
    handles = [lins[g[0]].register_forward_pre_hook(lambda m, a, acc=accs[g[0]]: acc.add(a[0])) for g in stage]
    samples = {g[0]: [] for g in stage}
    handles += [lins[g[0]].register_forward_pre_hook(
        lambda m, a, k=g[0]: samples[k].append(a[0].reshape(-1, a[0].shape[-1])[::sample_stride].float()))
        for g in stage]
    offload = offload or Offload("none", device)
    captured = {c: offload.stash() for c in capture}
    kept = {n: offload.stash() for n in keep_inputs}
    handles += [lins[n].register_forward_pre_hook(lambda m, a, n=n: kept[n].append(a[0])) for n in kept]
    handles += [getattr(block, c).register_forward_hook(lambda m, a, o, c=c: captured[c].append(o)) for c in capture]
    last = stage[-1][0]  # groups are in execution order
    inputs, outs = offload.stash(), offload.stash()
    if keep:
        handles.append(lins[last].register_forward_pre_hook(lambda m, a: inputs.append(a[0])))
    else:
        handles.append(lins[last].register_forward_pre_hook(_stop))  # after the Hessian hook
    try:
        with torch.inference_mode(), replaying(block, replay or {}):
            for b, (hidden, kw) in enumerate(cache):
                source[0] = int(split is not None and b >= split)
                try:
                    out = run_block(block, hidden, kw)
                    if keep:
                        outs.append(out)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return accs, time.perf_counter() - t0, outs, inputs, captured, kept, samples


class SplitHessian:
    """Hessians of the task and the general-text parts of the calibration set, kept apart for the
    anchored solve (``quantize_model(anchor=...)``); ``source[0]`` says which part a batch is from."""

    def __init__(self, n_features, device, low_precision, source):
        self.parts = [HessianAccumulator(n_features, device, low_precision) for _ in range(2)]
        self.source = source

    def add(self, x):
        self.parts[self.source[0]].add(x)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.parts)

    def hessian(self) -> torch.Tensor:
        """The Hessian of the whole set (token-weighted), under which GPTQ solves."""
        return (self.parts[0].H + self.parts[1].H) * (2.0 / self.n_tokens)

    def blend(self, W: torch.Tensor, W_anchor: torch.Tensor, cfg) -> torch.Tensor:
        """The weight minimising ``||(Q-W) X_task||^2 + ||(Q-W_anchor) X_general||^2 + lam ||Q-W||^2``:
        ``W* = (W H_task + W_anchor H_general + lam W) (H_task + H_general + lam I)^-1``, solved as a
        correction ``W + (W_anchor - W) H_general (H + lam I)^-1`` so that an anchor equal to the model
        leaves ``W`` exactly as it is. ``lam`` is the damping the GPTQ solve of this layer will use (its
        ``damp_percent``, raised as the solve raises it), so the two minimise the same objective.

        Along directions that the calibration barely reaches the least-squares correction can grow far
        beyond both weights (it is bounded only by ``lam``), and a GPTQ solve on a fixed grid turns such
        outliers into clamped codes whose errors cascade (measured on SmolLM2-135M: one ill-conditioned
        ``down_proj`` took the export to perplexity 4545, and the same damping as the solve did not help).
        The blend is therefore kept, elementwise, between the two weights it mixes: it may move each
        entry from ``W`` toward ``W_anchor``, never past either (perplexity 31.7; clamping only to the
        grid's range instead gave 261). BENCHMARKS.md, export roads."""
        Ht, Hg = (p.H.to(torch.float32) for p in self.parts)
        Hs = Ht + Hg
        _, damp = damped_inverse_cholesky(Hs * (2.0 / self.n_tokens), cfg.damp_percent, cfg.damp_auto_increment)
        Wf, Wa = W.to(Hs), W_anchor.to(Hs)
        rhs = Hg @ (Wa - Wf).t()  # [in, out]
        eye = torch.eye(Hs.shape[0], device=Hs.device)
        lam = damp * Hs.diagonal().mean().clamp_min(1e-12)
        while True:
            L, info = torch.linalg.cholesky_ex(Hs + eye * lam)
            if int(info) == 0:
                break
            lam = lam * 2
        out = Wf + torch.cholesky_solve(rhs, L).t()
        return torch.minimum(torch.maximum(out, torch.minimum(Wf, Wa)), torch.maximum(Wf, Wa)).contiguous()


def _tail_matches(block, first, shortcut, tol: float = 2e-2) -> bool:
    """Does ``output + x @ dW^T`` reproduce a real forward of the quantized block (batch 0)?"""
    hidden, kwargs = first
    n = min(2, hidden.shape[0])  # two sequences are enough to catch a block that is not residual
    with torch.inference_mode():
        ref = run_block(block, hidden[:n], slice_kwargs(kwargs, n)).float()
    shortcut = shortcut[:n]
    err = float((ref - shortcut.float()).norm() / ref.norm().clamp_min(1e-12))
    return err < tol


def _stop(module, args):
    raise _StopForward

