"""Scale folding, shared by AWQ and SmoothQuant: who produces each linear's input, how a per-channel
scale folds into it exactly, and the check that it did before anything is rounded.

Both methods divide input channel ``j`` of some linears by ``s_j`` and multiply weight column ``j`` by
``s_j``. The division goes into the module that produces the input, so it costs nothing at run time:

- a **norm**, whose output is ``x̂ ⊙ (w + c) + b``. The offset ``c`` is 0 for Llama's RMSNorm and for
  LayerNorm, and 1 for Gemma's ``x̂ · (1 + w)``; the exact fold is ``w' = (w + c) / s - c``,
  ``b' = b / s``. ``c`` is read off the norm's own output (``norm_offset``), never from a list of
  class names, so a new family with its own convention is folded right or not at all;
- a **linear** whose rows feed the consumer linearly (Llama's ``up_proj`` -> ``down_proj``): its rows
  and bias are divided by ``s``.

Which modules pair up is found by running the model (``smoothing_pairs``): the tensor a norm returns
is, by identity, the input of q/k/v or gate/up; a linear of the same block feeds another linearly
when doubling its weight exactly doubles the other's input (checked on the first block, applied to
every block). Linears with neither (o_proj under grouped-query attention) are left alone.

Lifecycle of a fold (``FoldCheck``):

1. **capture**: one forward of a short calibration sample records each decoder block's input;
2. **reference**: the first time a fold touches a block, the block is replayed in fp32 on that input,
   and its output and its linears' outputs are kept;
3. **fold and check**: after each fold the block is replayed again; the folded block must compute what
   the unfolded one did (``tolerance``). A fold that does not is undone, bit for bit, and reported:
   it never reaches the file;
4. **report**: ``FoldCheck.summary()`` counts the folds made and names the ones refused.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# Largest relative change a correct fold may leave in a block's output and its linears' outputs,
# replayed in fp32, by the precision the folded weights are stored in. Measured (BENCHMARKS.md, fold
# check): correct folds leave at most ~2e-6 in fp32 and ~6e-3 in bf16 weights; the wrong (1 + w) fold
# on Gemma-style norms leaves 0.1 to 10.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


class FoldError(RuntimeError):
    """A fold could not be made exact, where the caller asked for every fold or none."""


def _elementwise(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return not list(m.children()) and isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, nn.Linear)


@torch.no_grad()
def norm_offset(norm: nn.Module, atol: float = 1e-3) -> float | None:
    """The ``c`` of a norm computing ``x̂ ⊙ (w + c) + b``, read off its output; None when the output is
    not of that form (not affine in ``w``, or a ``c`` that differs by channel), so nothing folds into it.

    The norm runs in fp32 on a fixed random input with its weight set to 0, 1 and 2 (and any bias to 0),
    then both are put back exactly: ``out(1) - out(0)`` is ``x̂``, ``out(0)`` is ``c·x̂``."""
    x = torch.randn(8, norm.weight.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight.device)
    outs = []
    with _in_fp32(norm):
        w, b = norm.weight, getattr(norm, "bias", None)
        b = b if isinstance(b, torch.Tensor) else None
        saved_w, saved_b = w.detach().clone(), None if b is None else b.detach().clone()
        try:
            if b is not None:
                b.zero_()
            for v in (0.0, 1.0, 2.0):
                w.fill_(v)
                outs.append(norm(x).float())
        finally:
            w.copy_(saved_w)
            if b is not None:
                b.copy_(saved_b)
    o0, o1, o2 = outs
    xhat = o1 - o0
    scale = float(xhat.abs().max())
    if not scale or not torch.allclose(o2 - o1, xhat, rtol=atol, atol=atol * scale):
        return None
    seen = xhat.abs() > 0.1 * scale
    c = o0[seen] / xhat[seen]
    centre = float(c.median())
    if float((c - centre).abs().max()) > atol * max(1.0, abs(centre)) * 10:
        return None
    return float(round(centre)) if abs(centre - round(centre)) < atol else centre


@torch.no_grad()
def fold(producer: nn.Module, linears: list[nn.Module], s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide ``producer``'s output channels by ``s`` and multiply the matching weight columns of
    ``linears`` by ``s``. A norm's weight ``w`` (output ``x̂ ⊙ (w + offset) + b``) becomes
    ``(w + offset) / s - offset``; a linear's rows are divided by ``s``; a bias is divided by ``s``."""
    w = producer.weight
    if w.dim() == 1:
        w.copy_(((w.float() + offset) / s - offset).to(w.dtype))
    else:
        w.copy_((w.float() / s[:, None]).to(w.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))


@torch.inference_mode()
def smoothing_pairs(model: nn.Module, linears: dict[str, nn.Module],
                    sample: torch.Tensor) -> list[tuple[str, list[str]]]:
    """``[(producer, [linears whose input it produces])]``: each norm with the linears that read exactly
    its output (found on one forward of ``sample``, token ids ``[1, n]``; only elementwise leaf modules
    such as RMSNorm and LayerNorm count), then ``linear_feeds``' pairs for the linears no norm feeds."""
    outputs: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    keep = []  # the outputs stay alive during the forward, so ids are not reused
    handles = []
    for name, m in model.named_modules():
        if _elementwise(m):
            def post(mod, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    keep.append(out)
                    outputs[id(out)] = name
            handles.append(m.register_forward_hook(post))
    for name, lin in linears.items():
        def pre(mod, args, name=name):
            norm = outputs.get(id(args[0]))
            if norm is not None and name not in readers.setdefault(norm, []):
                readers[norm].append(name)
        handles.append(lin.register_forward_pre_hook(pre))
    try:
        model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    pairs = [(n, lins) for n, lins in readers.items() if modules[n].weight.numel() == linears[lins[0]].in_features]
    fed = {x for _, lins in pairs for x in lins}
    return pairs + linear_feeds(model, {n: m for n, m in linears.items() if n not in fed}, linears, sample)


def _input_of(model, lin, sample) -> torch.Tensor:
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
    finally:
        h.remove()
    return seen[0]


@torch.inference_mode()
def linear_feeds(model: nn.Module, consumers: dict[str, nn.Module], linears: dict[str, nn.Module],
                 sample: torch.Tensor) -> list[tuple[str, list[str]]]:
    """``[(producer linear, [consumer linear])]``: pairs where scaling the producer's output rows scales
    the consumer's input channels by the same factor (``up_proj`` -> ``down_proj``), found on the first
    decoder block by doubling each candidate's weight and applied to every block with the same names."""
    from .blocks import find_decoder_blocks

    prefix, blocks = find_decoder_blocks(model)
    head = f"{prefix}.0."
    found = []
    for cname, consumer in consumers.items():
        if not cname.startswith(head):
            continue
        x0 = None
        for pname, producer in linears.items():
            if not pname.startswith(head) or pname == cname or producer.out_features != consumer.in_features:
                continue
            x0 = _input_of(model, consumer, sample) if x0 is None else x0
            producer.weight.mul_(2)
            try:
                x1 = _input_of(model, consumer, sample)
            finally:
                producer.weight.div_(2)
            if torch.allclose(x1.float(), 2 * x0.float(), rtol=1e-2, atol=1e-6):
                found.append((pname[len(head):], cname[len(head):]))
                break
    return [(f"{prefix}.{i}.{p}", [f"{prefix}.{i}.{c}"]) for i in range(len(blocks)) for p, c in found
            if f"{prefix}.{i}.{p}" in linears and f"{prefix}.{i}.{c}" in consumers]


@contextmanager
def _in_fp32(module: nn.Module):
    """Run ``module`` in fp32 for a moment: its floating tensors are upcast (exact), then put back."""
    moved = []
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            moved.append((t, t.data))
            t.data = t.data.float()
    try:
        yield
    finally:
        for t, old in moved:
            t.data = old


def _fp32(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, tuple):
        return tuple(_fp32(x) for x in v)
    return v


def _rel(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None) -> float:
    base = b if base is None else base
    return float((a - b).norm() / base.norm().clamp_min(1e-30))


class FoldCheck:
    """Folds that are checked on the block they change, before anything is rounded (module docstring).

    ``model``: the full-precision model (folds happen in place); ``linears``: ``{qualified name:
    linear}`` of the decoder blocks; ``sample``: token ids ``[n, seq]``, a short calibration batch.
    ``tolerance`` defaults to ``TOLERANCE`` for the dtype the weights are stored in.
    """

    def __init__(self, model: nn.Module, linears: dict[str, nn.Module], sample: torch.Tensor,
                 tolerance: float | None = None):
        from .blocks import find_decoder_blocks

        self.model, self.linears = model, linears
        self.prefix, self.blocks = find_decoder_blocks(model)
        dtype = next(model.parameters()).dtype
        self.tolerance = TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
        self.modules = dict(model.named_modules())
        self.inputs: dict[int, tuple] = {}
        self.refs: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.offsets: dict[str, float | None] = {}
        self.folded, self.refused = 0, []
        self.worst = 0.0
        self._capture(sample)

    @torch.inference_mode()
    def _capture(self, sample: torch.Tensor) -> None:
        def grab(i):
            def pre(mod, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kw = {k: _fp32(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                self.inputs[i] = (hidden.detach().float().cpu(), args[1:], kw)
            return pre

        handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            self.model(input_ids=sample.to(next(self.model.parameters()).device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def block_of(self, name: str) -> int | None:
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        i = name[len(head):].split(".")[0]
        return int(i) if i.isdigit() else None

    @torch.inference_mode()
    def _replay(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Block ``i`` in fp32 on its captured input: ``(output, {linear name: output})``."""
        block = self.blocks[i]
        device = next(block.parameters()).device
        hidden, args, kw = self.inputs[i]
        to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else (  # noqa: E731
            tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in v) if isinstance(v, tuple) else v)
        outs: dict[str, torch.Tensor] = {}
        head = f"{self.prefix}.{i}."
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.detach().float().cpu()))
                   for n, m in self.linears.items() if n.startswith(head)]
        try:
            with _in_fp32(block):
                out = block(hidden.to(device), *[to(a) for a in args], **{k: to(v) for k, v in kw.items()})
        finally:
            for h in handles:
                h.remove()
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.detach().float().cpu(), outs

    def _reference(self, i: int | None) -> None:
        if i is not None and i not in self.refs:
            self.refs[i] = self._replay(i)

    def error(self, i: int, consumers: list[str]) -> float:
        """How far block ``i`` (and the ``consumers`` among its linears) now is from its reference: the
        relative change of each consumer's output, and of the block's update ``output - input`` (the
        residual stream itself can dwarf what the block adds: Gemma's reaches 1e5)."""
        ref_out, ref_lins = self.refs[i]
        out, lins = self._replay(i)
        update = ref_out - self.inputs[i][0]
        errs = [_rel(out, ref_out, update)] + [_rel(lins[n], ref_lins[n]) for n in consumers if n in ref_lins]
        return max(errs)

    @torch.no_grad()
    def apply(self, producer: str, consumers: list[str], s: torch.Tensor) -> bool:
        """Fold ``s`` from ``producer`` into ``consumers`` and keep it only if it is exact (see the module
        docstring); returns whether it was kept. A refused fold leaves every weight as it was."""
        module = self.modules[producer]
        if module.weight.dim() == 1:
            if producer not in self.offsets:
                self.offsets[producer] = norm_offset(module)
            offset = self.offsets[producer]
            if offset is None:
                self._refuse(producer, consumers, "its output is not x̂ ⊙ (w + c) + b, so no exact fold exists")
                return False
        else:
            offset = 0.0
        where = {self.block_of(producer), *(self.block_of(n) for n in consumers)}
        if None in where:
            self._refuse(producer, consumers, "it is outside the decoder blocks, where the fold cannot be checked")
            return False
        for i in where:
            self._reference(i)
        lins = [self.linears[n] for n in consumers]
        saved = [t.detach().clone() for t in self._tensors(module, lins)]
        fold(module, lins, s.to(module.weight.device), offset)
        err = max(self.error(i, consumers) for i in where)
        if err > self.tolerance:
            for t, old in zip(self._tensors(module, lins), saved):
                t.copy_(old)
            self._refuse(producer, consumers, f"folded, its block's output moved by {err:.2e} (relative; tolerance "
                                              f"{self.tolerance:.0e})", err)
            return False
        self.worst = max(self.worst, err)
        self.folded += 1
        return True

    @staticmethod
    def _tensors(module, lins):
        ts = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
        return ts + [lin.weight for lin in lins]

    def _refuse(self, producer: str, consumers: list[str], why: str, err: float | None = None) -> None:
        import warnings

        self.refused.append({"producer": producer, "layers": consumers, "reason": why, "error": err})
        warnings.warn(f"fold of {producer} into {consumers} refused and left unfolded: {why}.", stacklevel=3)

    def summary(self) -> dict:
        """What the export summary records: folds made, the largest change one left, and those refused."""
        return {"folds": self.folded, "fold_max_error": self.worst, "folds_refused": len(self.refused),
                "refused_folds": self.refused}
