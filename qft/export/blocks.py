"""What GPTQ export needs to know about a decoder block, found by running it, not hard-coded.

Which ``nn.ModuleList`` holds the blocks, which linear layers share an input (solved together), which
sub-modules end in a linear layer (replayable from that layer's saved inputs), and the stand-in that
replays a final sub-module while later stages of the same block are calibrated.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from qft import layers

from .config import GPTQConfig


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks holding linear layers (``model.model.layers`` for Llama).

    Linear layers of any kind count (``qft.layers``: plain, NF4, LoRA, fake-quant, converted), so a
    trained model is recognised before it is merged.
    """
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1 \
                and layers.linear_layers(mod[0]):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of identical modules with "
                         "linear layers); GPTQ export supports transformer decoders such as LlamaForCausalLM.")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one block (``qft.layers.linear_layers``), in execution-independent module order."""
    return layers.linear_layers(block)


def check_model(model: nn.Module, cfg: GPTQConfig) -> list[str]:
    """Validate every quantizable layer before any work; return warnings about short last groups.

    The solver overwrites plain weights, so every layer must be a plain ``nn.Linear`` by now: a trained
    model is first folded into one by ``qft.export.merge.merge_adapters``.
    """
    prefix, blocks = find_decoder_blocks(model)
    odd, bad = [], []
    for i, block in enumerate(blocks):
        for n, lin in block_linears(block).items():
            full = f"{prefix}.{i}.{n}"
            if layers.kind_of(lin).name != "linear":
                raise TypeError(f"GPTQ: layer {full} is a {type(lin).__name__}; quantize the plain model that "
                                "qft.export.merge.merge_adapters builds from a trained one.")
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


def run_block(block, hidden, kwargs):
    kw = dict(kwargs)
    extra = kw.pop("_args", ())
    out = block(hidden, *extra, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def _probe(block, hidden, kwargs, handles) -> None:
    """Run one sequence through ``block`` so its hooks (``handles``) can look, then remove them."""
    try:
        with torch.inference_mode():
            run_block(block, hidden[:1], kwargs if hidden.shape[0] == 1 else slice_kwargs(kwargs, 1))
    finally:
        for h in handles:
            h.remove()


def discover_groups(block: nn.Module, hidden, kwargs) -> list[list[str]]:
    """Linear layers of ``block`` in execution order, grouped by the input tensor they share."""
    order, inputs = [], {}
    handles = []
    for name, lin in block_linears(block).items():
        def pre(mod, args, name=name):
            order.append(name)
            inputs[name] = args[0]  # keeping the tensor alive: its identity (not its address) groups layers
        handles.append(lin.register_forward_pre_hook(pre))
    _probe(block, hidden, kwargs, handles)
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


def child_endings(block: nn.Module, hidden, kwargs) -> dict[str, tuple[str, int]]:
    """Direct children of ``block`` whose output is their last linear layer's output, as it came out.

    ``{child: (linear name, tuple length or 0 for a bare tensor)}``: e.g. Llama's ``self_attn`` returns
    ``(o_proj(x), None)``. Once such a child is final, its output is that linear applied to its saved
    input, so the rest of the child (q/k/v, attention) need not run again. Checked by tensor identity on
    one sequence, so an architecture that post-processes the output is simply not listed.
    """
    outs, child_out, handles = {}, {}, []
    lins = block_linears(block)
    for name, lin in lins.items():
        handles.append(lin.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o)))
    for child, mod in block.named_children():
        handles.append(mod.register_forward_hook(lambda m, a, o, child=child: child_out.__setitem__(child, o)))
    _probe(block, hidden, kwargs, handles)
    found = {}
    for child, out in child_out.items():
        first, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        for name, o in outs.items():
            if name.startswith(child + ".") and o is first and all(r is None for r in rest):
                found[child] = (name, len(out) if isinstance(out, tuple) else 0)
    return found


def slice_kwargs(kwargs, n):
    """Batch-slice tensors whose first dim is the batch (position embeddings, masks) for a discovery run."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def final_children(stages) -> dict[str, int]:
    """Direct children of a block holding linear layers -> the stage after which they are final.

    Stages run in execution order, so once a child's last linear layer is quantized, everything before
    the child is too: its inputs and weights no longer change, and its output can be saved and replayed.
    """
    stage_of = {n: si for si, stage in enumerate(stages) for g in stage for n in g}
    last: dict[str, int] = {}
    for n, si in stage_of.items():
        child = n.split(".")[0]
        if "." in n:  # a linear that is itself a direct child is cheap to recompute
            last[child] = max(last.get(child, -1), si)
    return last


class Replay(nn.Module):
    """Stands in for a child module during one pass over the cached batches, returning its saved outputs."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.outputs[self.calls - 1]


@contextmanager
def replaying(block: nn.Module, saved: dict[str, list]):
    """Swap the children named in ``saved`` for ``Replay`` stand-ins for one pass, then put them back."""
    originals = {name: getattr(block, name) for name in saved}
    try:
        for name, outs in saved.items():
            setattr(block, name, Replay(outs))
        yield
    finally:
        for name, mod in originals.items():
            setattr(block, name, mod)
