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
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTQConfig
from .gptq import HessianAccumulator, QuantizedWeight, gptq_solve, relative_output_error, rtn_solve


class _StopForward(Exception):
    """Raised from a hook to end a forward early; never escapes this module."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks holding linear layers (``model.model.layers`` for Llama)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1 \
                and any(isinstance(x, nn.Linear) for x in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of identical modules with "
                         "linear layers); GPTQ export supports transformer decoders such as LlamaForCausalLM.")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def check_model(model: nn.Module, cfg: GPTQConfig) -> list[str]:
    """Validate every quantizable layer before any work; return warnings about short last groups."""
    prefix, blocks = find_decoder_blocks(model)
    odd, bad = [], []
    for i, block in enumerate(blocks):
        for n, lin in block_linears(block).items():
            full = f"{prefix}.{i}.{n}"
            if lin.in_features % 32 or lin.out_features % 32:
                bad.append(f"{full} ({lin.out_features}x{lin.in_features})")
            if cfg.group_size != -1 and lin.in_features % cfg.group_size:
                odd.append(f"{full} (in_features={lin.in_features})")
    if bad:
        raise ValueError("GPTQ int32 packing needs in_features and out_features divisible by 32; these layers are "
                         f"not: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    msgs = []
    if odd:
        msgs.append(f"group_size={cfg.group_size} does not divide in_features of {len(odd)} layers (e.g. {odd[0]}): "
                    "their last group is short. The checkpoint is valid GPTQ and loads with qft.load_quantized, but "
                    "gptqmodel's CPU kernels and vLLM refuse it; pick a divisor (e.g. 64 or 32) for those runtimes.")
        warnings.warn(msgs[-1], stacklevel=3)
    return msgs


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
def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int, device) -> list:
    """Run the embeddings once per batch and keep what the first block receives: ``[(hidden, kwargs)]``."""
    prefix, blocks = find_decoder_blocks(model)
    cache = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache.append((hidden, {**kwargs, **({"_args": args[1:]} if len(args) > 1 else {})}))
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


def _run_block(block, hidden, kwargs):
    kw = dict(kwargs)
    extra = kw.pop("_args", ())
    out = block(hidden, *extra, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def discover_groups(block: nn.Module, hidden, kwargs) -> list[list[str]]:
    """Linear layers of ``block`` in execution order, grouped by the input tensor they share."""
    order, inputs = [], {}
    handles = []
    for name, lin in block_linears(block).items():
        def pre(mod, args, name=name):
            order.append(name)
            inputs[name] = args[0]  # keeping the tensor alive: its identity (not its address) groups layers
        handles.append(lin.register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            _run_block(block, hidden[:1], kwargs if hidden.shape[0] == 1 else _slice_kwargs(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in dict.fromkeys(order):
        if groups and inputs[groups[-1][0]] is inputs[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = set(block_linears(block)) - set(order)
    if missing:
        raise RuntimeError(f"GPTQ: layers {sorted(missing)} never ran in a block forward; cannot calibrate them.")
    return groups


def _slice_kwargs(kwargs, n):
    """Batch-slice tensors whose first dim is the batch (position embeddings, masks) for a discovery run."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: GPTQConfig, tokens: torch.Tensor | None = None, device=None,
                   batch_size: int = 16, progress: bool = True):
    """Quantize every linear layer in the decoder blocks of ``model`` (lm_head stays full precision).

    Returns ``(quantized, rows)``: ``{qualified layer name: QuantizedWeight}`` and per-layer report rows.
    The model's linear weights are overwritten with their dequantized values (so the model can be
    evaluated as is); the integer codes are what ``save_quantized`` packs.
    """
    from tqdm.auto import tqdm

    check_model(model, cfg)
    prefix, blocks = find_decoder_blocks(model)
    device = torch.device(device or next(model.parameters()).device)
    n_layers = sum(len(block_linears(b)) for b in blocks)
    bar = tqdm(total=n_layers, desc=f"{cfg.method.upper()} {cfg.bits}-bit", unit="layer", disable=not progress)
    quantized: dict[str, QuantizedWeight] = {}
    rows: list[dict] = []

    def commit(i, names, lin_map, qw: QuantizedWeight, seconds, n_tokens, H=None):
        start = 0
        for n in names:
            lin = lin_map[n]
            part = qw.rows(start, start + lin.out_features)
            start += lin.out_features
            full = f"{prefix}.{i}.{n}"
            quantized[full] = part
            deq = part.dequantize().to(lin.weight.device)
            # per layer, on its calibration inputs (RTN has none: H = I, the relative weight error)
            h = H if H is not None else torch.eye(lin.in_features, device=deq.device)
            part.rel_error = relative_output_error(lin.weight, deq, h)
            lin.weight.copy_(deq.to(lin.weight))
            rows.append(dict(layer=full, block=i, in_features=lin.in_features, out_features=lin.out_features,
                             shared_with=",".join(x for x in names if x != n), method=cfg.method, bits=cfg.bits,
                             group_size=cfg.group_size, damp_percent=qw.damp_percent, n_tokens=n_tokens,
                             gptq_loss=qw.loss, rel_output_error=part.rel_error, seconds=round(seconds, 4)))
            bar.update(1)

    if cfg.method == "rtn":
        for i, block in enumerate(blocks):
            lins = block_linears(block)
            for n, lin in lins.items():
                t0 = time.perf_counter()
                qw = rtn_solve(lin.weight.to(device), cfg)
                commit(i, [n], lins, _to_cpu(qw), time.perf_counter() - t0, 0)
        bar.close()
        return quantized, rows

    if tokens is None:
        raise ValueError("quantize_model(method='gptq') needs calibration tokens; see qft.export.calibration.")
    cache = capture_block_inputs(model, tokens, batch_size, device)
    groups = None
    for i, block in enumerate(blocks):
        bar.set_postfix_str(f"block {i + 1}/{len(blocks)}")
        home = next(block.parameters()).device
        block.to(device)
        lins = block_linears(block)
        if groups is None:
            groups = discover_groups(block, *cache[0])
        stages = [[g] for g in groups] if cfg.true_sequential else [groups]
        next_cache = None
        for si, stage in enumerate(stages):
            # The last stage of a true-sequential block is usually one linear layer whose output is added
            # to the block output (Llama's down_proj). Then the block need not be run again afterwards:
            # next input = output with the old weight + x @ (W_q - W)^T, checked on one batch below.
            tail = cfg.true_sequential and si == len(stages) - 1 and len(stage[0]) == 1 and i + 1 < len(blocks)
            stage_out = _collect_stage(block, lins, stage, cache, device, keep=tail)
            accs, fwd_s, outs, tail_inputs = stage_out
            for g in stage:
                t1 = time.perf_counter()
                old = lins[g[0]].weight.detach().clone() if tail else None
                W = torch.cat([lins[n].weight for n in g], 0)
                H = accs[g[0]].hessian()
                qw = gptq_solve(W, H, cfg)
                commit(i, g, lins, _to_cpu(qw), time.perf_counter() - t1 + fwd_s / len(stage), accs[g[0]].n_tokens, H)
            if tail:
                delta = lins[stage[0][0]].weight - old
                with torch.inference_mode():
                    next_cache = [(o + F.linear(x, delta), kw) for o, x, (_, kw) in zip(outs, tail_inputs, cache)]
                if not _tail_matches(block, cache[0], next_cache[0][0]):
                    next_cache = None
            del accs, outs, tail_inputs
        if i + 1 < len(blocks):
            if next_cache is None:
                with torch.inference_mode():
                    next_cache = [(_run_block(block, hidden, kw), kw) for hidden, kw in cache]
            cache = next_cache
        block.to(home)
    bar.close()
    return quantized, rows


def _collect_stage(block, lins, stage, cache, device, keep=False):
    """Run the cached inputs through ``block`` to accumulate the Hessians of ``stage``'s groups.

    Without ``keep`` the forward stops at the pre-hook of the last group's first layer (its input is all
    the group needs). With ``keep`` it runs to the end and returns the outputs and that layer's inputs.
    """
    t0 = time.perf_counter()
    accs = {g[0]: HessianAccumulator(lins[g[0]].in_features, device) for g in stage}
    handles = [lins[g[0]].register_forward_pre_hook(lambda m, a, acc=accs[g[0]]: acc.add(a[0])) for g in stage]
    last = stage[-1][0]  # groups are in execution order
    inputs, outs = [], []
    if keep:
        handles.append(lins[last].register_forward_pre_hook(lambda m, a: inputs.append(a[0])))
    else:
        handles.append(lins[last].register_forward_pre_hook(_stop))  # after the Hessian hook
    try:
        with torch.inference_mode():
            for hidden, kw in cache:
                try:
                    out = _run_block(block, hidden, kw)
                    if keep:
                        outs.append(out)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return accs, time.perf_counter() - t0, outs, inputs


def _tail_matches(block, first, shortcut, tol: float = 2e-2) -> bool:
    """Does ``output + x @ dW^T`` reproduce a real forward of the quantized block (batch 0)?"""
    with torch.inference_mode():
        ref = _run_block(block, *first).float()
    err = float((ref - shortcut.float()).norm() / ref.norm().clamp_min(1e-12))
    return err < tol


def _stop(module, args):
    raise _StopForward


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    qw.codes, qw.scale, qw.zero, qw.g_idx = (t.cpu() for t in (qw.codes, qw.scale, qw.zero, qw.g_idx))
    return qw
