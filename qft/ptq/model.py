"""``quantize_w8a8``: post-training int8 weights and activations, on the export's calibration machinery.

Lifecycle (each step only when the config asks for it):

1. **validate**: the config, the model (plain linears: a trained model is merged first, as for GPTQ)
   and the calibration tokens, before any work; grids QAT learned (``fixed``, ``input_scales``) are
   kept as they are, and nothing is measured for them;
2. **smooth** (``smoothquant=alpha``): one forward pass collects each norm-fed linear's input magnitude
   per channel, and SmoothQuant's scales are folded into the norms and weights (``qft.ptq.smoothquant``),
   each fold checked on its block before any rounding and left out if it is not exact
   (``qft.export.fold.FoldCheck``; the summary counts and names those);
3. **weights**: every decoder-block linear is rounded to int8 per output channel, by RTN or by GPTQ's
   block-by-block solve (``qft.export.sequential.quantize_model``, the GPTQ exporter's own engine);
4. **activations** (``activation="static"``): one forward pass of the weight-quantized model gives each
   layer's input range, hence its per-tensor scale; ``dynamic`` needs none (scales per token at run time);
5. **swap**: each linear becomes a ``W8A8Linear`` holding what the checkpoint will hold.

The model is changed in place; ``qft.ptq.save_w8a8`` writes it as a compressed-tensors checkpoint.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from qft.export.blocks import block_linears, check_model, find_decoder_blocks
from qft.export.calibration import CalibrationError
from qft.export.fold import FoldCheck, smoothing_pairs

from .calibrate import input_absmax
from .config import W8A8Config
from .layer import W8A8Linear, input_scale_from_absmax
from .smoothquant import smooth

CHECK_TOKENS = 128  # of the first calibration window: the batch each fold is checked on


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: linear}`` of every decoder block: the layers W8A8 quantizes (the head stays)."""
    prefix, blocks = find_decoder_blocks(model)
    return {f"{prefix}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in block_linears(b).items()}


def needs_calibration(model: nn.Module, cfg: W8A8Config, fixed: dict | None = None,
                      input_scales: dict | None = None) -> bool:
    """Whether anything is measured on data: SmoothQuant, a GPTQ solve of a layer without a kept grid,
    or a static range that QAT did not learn (``fixed``/``input_scales``: what ``qft.ptq.learned`` keeps)."""
    names = decoder_linears(model)
    fixed, input_scales = fixed or {}, input_scales or {}
    return (cfg.smoothquant is not None
            or cfg.weight_method == "gptq" and any(n not in fixed for n in names)
            or cfg.activation == "static" and any(n not in input_scales for n in names))


def quantize_w8a8(model: nn.Module, cfg: W8A8Config, tokens: torch.Tensor | None = None, batch_size: int = 16,
                  device=None, progress: bool = True, compute_dtype: torch.dtype | None = None,
                  fixed: dict | None = None, input_scales: dict | None = None) -> dict:
    """Quantize ``model``'s decoder linears to W8A8 in place (see the module docstring); returns a summary
    with the time of each step, the layers smoothed and the report rows of the weight solve.

    ``compute_dtype``: the parameters are cast to it after smoothing (which is best folded in the
    model's own, usually fp32, precision) and before the weight solve and the activation ranges.
    ``fixed`` (``{layer: QuantizedWeight}``) and ``input_scales`` (``{layer: static input scale}``) are
    grids chosen before, by QAT (``qft.ptq.learned``): they are written as they are, never re-solved."""
    if not isinstance(cfg, W8A8Config):
        raise TypeError(f"quantize_w8a8(cfg={cfg!r}): expected a qft.ptq.W8A8Config.")
    gcfg = cfg.gptq_config()
    check_model(model, gcfg)
    fixed, input_scales = fixed or {}, dict(input_scales or {})
    if (fixed or input_scales) and cfg.smoothquant is not None:
        raise ValueError("quantize_w8a8: SmoothQuant rescales weights and inputs, so it cannot keep fixed grids "
                         "(fixed=/input_scales=); drop one of them.")
    if tokens is None and needs_calibration(model, cfg, fixed, input_scales):
        raise CalibrationError(f"quantize_w8a8: activation={cfg.activation!r}, smoothquant={cfg.smoothquant!r}, "
                               f"weight_method={cfg.weight_method!r} need calibration tokens for the layers without "
                               "a learned grid; pass some, or use W8A8Config() (dynamic, RTN, no SmoothQuant), which "
                               "needs none.")
    if tokens is not None and (tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"quantize_w8a8(tokens=...): token ids [n, seq] expected, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}; see qft.export.calibration.calibration_tokens.")
    from qft.export.sequential import quantize_model

    linears = decoder_linears(model)
    summary: dict = {"config": cfg.to_dict(), "layers": len(linears)}
    was_training = model.training
    model.eval()
    t = time.perf_counter()
    if cfg.smoothquant is not None:
        pairs = smoothing_pairs(model, linears, tokens[:1, :32])
        dev = torch.device(device or next(model.parameters()).device)
        low = compute_dtype not in (None, torch.float32)  # magnitudes need no fp32 forward; folding stays fp32
        with torch.autocast(dev.type, dtype=compute_dtype or torch.float32, enabled=low):
            stats = input_absmax(model, tokens, {names[0]: linears[names[0]] for _, names in pairs}, batch_size,
                                 device)
        check = FoldCheck(model, linears, tokens[:1, :CHECK_TOKENS])  # every fold exact, or left out
        scales = smooth(model, linears, stats, pairs, cfg.smoothquant, check)
        summary["smoothed"] = {norm: names for norm, names in pairs if norm in scales}
        summary.update(check.summary())
        summary["largest_smoothing_scale"] = max(scales.values(), default=None)
        summary["smooth_s"] = time.perf_counter() - t
    if compute_dtype is not None:
        for p in model.parameters():  # parameters only: rotary inv_freq stays fp32 (qft.export.pipeline)
            p.data = p.data.to(compute_dtype)
    t = time.perf_counter()
    quantized, rows = quantize_model(model, gcfg, tokens if cfg.weight_method == "gptq" else None, device=device,
                                     batch_size=batch_size, progress=progress, fixed=fixed)
    summary["weights_s"] = time.perf_counter() - t
    summary["learned_layers"], summary["learned_input_scales"] = len(fixed), len(input_scales)
    in_scales = input_scales if cfg.activation == "static" else {}
    todo = {n: lin for n, lin in linears.items() if n not in in_scales}
    if cfg.activation == "static" and todo:
        t = time.perf_counter()
        ranges = input_absmax(model, tokens, todo, batch_size, device)
        in_scales.update({n: input_scale_from_absmax(r.max()) for n, r in ranges.items()})
        summary["activations_s"] = time.perf_counter() - t
    modules = dict(model.named_modules())
    for name, lin in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, W8A8Linear.from_quantized(quantized[name], lin.bias, in_scales.get(name))
                .to(lin.weight.device))
    model.train(was_training)
    summary["rows"] = rows
    return summary
