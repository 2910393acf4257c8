"""``qft export``: the post-fit export from the command line (wired into ``qft/cli.py`` by the lead).

    qft export --ckpt runs/last.ckpt --output out/int4 --bits 4 --group-size 64 --calibration data.txt
    qft export --adapter runs/adapter --model smollm2-135m --output out/int4 --calibration data.txt

``--ckpt`` is a qft Lightning checkpoint: the module is rebuilt by the class that saved it, with the
adapter ranks and layer swaps (QAT) the checkpoint records (``CausalLMModule.on_load_checkpoint``), so
a QAT-trained model is exported on the grid it learned. ``--adapter`` is a peft adapter directory
(``adapter_config.json`` + weights). Either way the merge/GPTQ/write path is
``qft.export.pipeline.export``, the same one ``GPTQExportCallback`` runs.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from .calibration import (
    DEFAULT_N_SAMPLES,
    DEFAULT_SEQ_LEN,
    GENERAL_FRACTION,
    CalibrationError,
    calibration_mix,
    model_max_length,
    skip_start,
)
from .checkpoint import check_output_dir
from .config import HESSIAN_DTYPES, METHODS, SUPPORTED_BITS, GPTQConfig
from .gguf.config import METHODS as GGUF_ALL_METHODS
from .gguf.config import QUANTS as GGUF_QUANTS
from .merge import DEFAULT_MERGE_INTO, MERGE_INTO, check_merge_into
from .offload import OFFLOADS, check_offload
from .pipeline import (
    BACKENDS,
    DTYPES,
    GENERAL_TARGETS,
    QAT_GRIDS,
    check_backend,
    export,
    export_config,
    needs_calibration,
    road,
)
from .prune import PATTERNS, PRUNE_METHODS

FORMATS = ("gptq", "w8a8", "gguf")
GGUF_METHODS = tuple(m for m in GGUF_ALL_METHODS if m not in METHODS)  # --format gguf's own (imatrix)
ACTIVATIONS = ("dynamic", "static")

_D = GPTQConfig()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="qft Lightning checkpoint (.ckpt) of a fine-tuned CausalLMModule")
    src.add_argument("--adapter", help="peft adapter directory (adapter_config.json)")
    parser.add_argument("--model", help="base model (built-in name or path); default: from the checkpoint/adapter")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (must not exist)")
    parser.add_argument("--calibration", help="calibration text file (not needed when QAT's grid is kept for "
                                              "every layer)")
    parser.add_argument("--general-calibration", help="general text file mixed into the calibration set, so the "
                                                      "solve keeps the base model's general ability")
    parser.add_argument("--general-fraction", type=float, default=GENERAL_FRACTION,
                        help=f"share of calibration windows from --general-calibration (default {GENERAL_FRACTION})")
    parser.add_argument("--general-start", type=float, default=0.0,
                        help="skip this fraction of --general-calibration (0.5 for WikiText-2 test: its second "
                             "half, disjoint from the standard evaluation windows)")
    parser.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--bits", type=int, default=None, choices=SUPPORTED_BITS,
                        help=f"default: the grid QAT trained, else {_D.bits}")
    parser.add_argument("--group-size", type=int, default=None,
                        help=f"-1 = one scale per output row; default: the grid QAT trained, else {_D.group_size}")
    parser.add_argument("--asym", action="store_true", default=None,
                        help="asymmetric grid (default: the grid QAT trained, else symmetric)")
    parser.add_argument("--qat-grid", default=None, choices=QAT_GRIDS,
                        help="for layers QAT trained: keep the learned grid (bit-exact), refine its codes with "
                             "GPTQ, or resolve a new grid (default: refine with --general-calibration, else keep)")
    parser.add_argument("--general-target", default=None, choices=GENERAL_TARGETS,
                        help="what the export reproduces on general-text windows: the released base model, or "
                             "the fine-tune (default: base with --general-calibration, else trained)")
    parser.add_argument("--desc-act", action="store_true", help="act-order (static groups)")
    parser.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                        help="group-aware reordering (g_idx stays natural); default: on unless --desc-act")
    parser.add_argument("--no-true-sequential", action="store_true")
    parser.add_argument("--damp-percent", type=float, default=_D.damp_percent)
    parser.add_argument("--hessian-dtype", default=_D.hessian_dtype, choices=HESSIAN_DTYPES)
    parser.add_argument("--mse", action="store_true", help="grid-search the clipping range")
    parser.add_argument("--method", default="gptq", choices=METHODS + GGUF_METHODS,
                        help="gptq; rtn (round-to-nearest); awq (AWQ scales and clipping, written as an AWQ GEMM "
                             "checkpoint, 4-bit); awq_gptq (AWQ scales, then GPTQ, written as GPTQ). --format w8a8 "
                             "takes gptq or rtn; --format gguf takes gptq, imatrix (importance-weighted block grids, "
                             "no GPTQ) or rtn")
    parser.add_argument("--quant", default=None, choices=GGUF_QUANTS,
                        help="--format gguf: llama.cpp's mix (default Q4_K_M), with the per-tensor formats "
                             "llama-quantize picks")
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="fraction of each decoder linear's weights set to zero (0.5 for 2:4); with --method none "
                             "the pruned weights stay floating point")
    parser.add_argument("--sparsity-pattern", default="unstructured", choices=PATTERNS)
    parser.add_argument("--prune-method", default="sparsegpt", choices=PRUNE_METHODS,
                        help="magnitude (no data), wanda (|W| * ||x||), sparsegpt (chosen and compensated inside the "
                             "solve, with GPTQ in the same pass)")
    parser.add_argument("--merge-into", default=DEFAULT_MERGE_INTO, choices=MERGE_INTO,
                        help="base of frozen layers: the one the adapters trained on, or the original fp weights")
    parser.add_argument("--backend", default="qft", choices=BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--save-dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the unquantized tensors (auto: fp16 for an fp32 model)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--allow-unsafe-load", action="store_true",
                        help="read a --ckpt that needs full unpickling (it can run code from the file: trusted "
                             "files only; qft's own checkpoints never need it)")
    parser.add_argument("--no-drift", action="store_true", help="skip the merged-vs-trained drift measurement")
    parser.add_argument("--layerwise", action="store_true",
                        help="read, merge and quantize one decoder block at a time from the base's safetensors, "
                             "writing a shard per block: memory no longer grows with depth (--adapter only; no "
                             "QAT grids, anchoring or drift)")
    parser.add_argument("--no-reuse-outputs", action="store_true",
                        help="recompute sub-module outputs inside a block instead of keeping them: less memory, "
                             "more time")
    parser.add_argument("--format", default="gptq", choices=FORMATS,
                        help="gptq: weight-only GPTQ checkpoint (transformers, vLLM); w8a8: int8 weights and "
                             "activations as a compressed-tensors checkpoint (vLLM), see --activation; gguf: one "
                             "llama.cpp file (--output F.gguf), see --quant")
    parser.add_argument("--activation", default=None, choices=ACTIVATIONS,
                        help="--format w8a8: int8 inputs quantized per token at run time (dynamic), or with one "
                             "calibrated scale per layer (static, needs --calibration unless QAT learned the "
                             "ranges); default: what QAT trained, else dynamic")
    parser.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                        help="--format w8a8: SmoothQuant migration strength in [0, 1] (0.5 in the paper; needs "
                             "--calibration)")
    parser.add_argument("--calibration-offload", default="none", choices=OFFLOADS,
                        help="where the cached calibration activations wait: on --device (none), in host memory "
                             "(cpu: for an accelerator) or in temporary files (disk); the result is the same")
    return parser


def _from_ckpt(path: str, model_name: str | None, merge_into: str, allow_unsafe: bool = False):
    """Rebuild the trained module from a qft checkpoint: ``(model, tokenizer, base name, masks)``."""
    from qft.module import CausalLMModule

    module = CausalLMModule.load_any(path, allow_unsafe, **({"model": model_name} if model_name else {}))
    return module.model, module.tokenizer, module.hparams.model, None


def _from_adapter(path: str, model_name: str | None, merge_into: str):
    from peft import PeftModel

    from qft.models import load_model, load_tokenizer

    model_name, quantization = _adapter_base(path, model_name)
    base = load_model(model_name, dtype=torch.float32)
    if check_merge_into(merge_into) == "trained" and quantization != "none":
        from qft.qlora import quantize_nf4  # adapters trained on an NF4 base merge into that base

        quantize_nf4(base, double_quant=quantization == "nf4-dq")
    return PeftModel.from_pretrained(base, path).eval(), load_tokenizer(model_name), model_name, None


def _adapter_base(path: str, model_name: str | None) -> tuple[str, str]:
    """The base model (``--model``, else what the adapter records) and the quantization it trained on."""
    from .layerwise import adapter_base

    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {path}: no adapter_config.json; pass a peft adapter directory.")
    recorded, quantization = adapter_base(path)
    model_name = model_name or recorded
    if not model_name:
        raise ValueError("--adapter: the adapter does not name its base model; pass --model.")
    return model_name, quantization


def run(args) -> dict:
    """Validate everything, then merge, quantize and write; prints and returns the summary."""
    if args.format == "w8a8":
        return _run_w8a8(args)
    if args.format == "gguf":
        return _run_gguf(args)
    if args.quant is not None or args.method in GGUF_METHODS:
        flag = "--quant" if args.quant is not None else f"--method {args.method}"
        raise ValueError(f"qft export {flag} applies to --format gguf; add --format gguf or drop {flag}.")
    for flag, value in (("--activation", args.activation is not None), ("--smoothquant", args.smoothquant)):
        if value:
            raise ValueError(f"qft export {flag} applies to --format w8a8 (GPTQ quantizes weights only); add "
                             f"--format w8a8 or drop {flag}.")
    solver = dict(desc_act=args.desc_act, act_group_aware=args.act_group_aware,
                  true_sequential=not args.no_true_sequential, damp_percent=args.damp_percent,
                  hessian_dtype=args.hessian_dtype, mse=args.mse, method=args.method, sparsity=args.sparsity,
                  sparsity_pattern=args.sparsity_pattern, prune_method=args.prune_method)
    grid = dict(bits=args.bits, group_size=args.group_size, sym=None if args.asym is None else not args.asym)
    GPTQConfig(**{k: v for k, v in grid.items() if v is not None}, **solver)  # fail on bad values before loading
    general_rows = round(args.n_samples * args.general_fraction) if args.general_calibration else 0
    qat_grid, general_target = road(args.qat_grid, args.general_target, general_rows, args.n_samples, "qft export",
                                    args.backend)
    check_merge_into(args.merge_into, "qft export")
    check_offload(args.calibration_offload, "--calibration-offload", args.backend)
    if args.layerwise:
        _check_layerwise(args)
    check_backend(args.backend)
    check_output_dir(args.output, args.overwrite)
    for flag, value in (("--calibration", args.calibration), ("--general-calibration", args.general_calibration)):
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value}: no such file (a text file is expected).")
    if not 0 <= args.general_fraction <= 1:
        raise ValueError(f"--general-fraction {args.general_fraction}: a number in [0, 1].")
    if not 0 <= args.general_start < 1:
        raise ValueError(f"--general-start {args.general_start}: a number in [0, 1) (0.5: the second half).")
    if args.layerwise:
        return _run_layerwise(args, grid, solver)
    if args.ckpt:
        model, tok, base_name, masks = _from_ckpt(args.ckpt, args.model, args.merge_into, args.allow_unsafe_load)
    else:
        model, tok, base_name, masks = _from_adapter(args.adapter, args.model, args.merge_into)
    cfg = export_config(model, qat_grid, **grid, **solver)
    tokens = None
    if args.calibration is not None:
        tokens = calibration_mix(args.calibration, skip_start(args.general_calibration, args.general_start), tok,
                                 args.n_samples, args.seq_len,
                                 args.general_fraction, max_length=model_max_length(model))
    elif needs_calibration(model, cfg, qat_grid):
        raise CalibrationError("qft export: --calibration is required (GPTQ solves layers QAT did not train).")
    if tokens is None or not needs_calibration(model, cfg, qat_grid):
        general_rows, general_target = 0, "trained"  # nothing is solved, nothing to anchor
    summary = export(model, tok, tokens, args.output, cfg, base_name=base_name, merge_into=args.merge_into,
                     reuse_outputs=not args.no_reuse_outputs, calibration_offload=args.calibration_offload,
                     masks=masks, backend=args.backend, device=args.device, dtype=args.dtype,
                     overwrite=args.overwrite, measure_drift=not args.no_drift, qat_grid=qat_grid,
                     save_dtype=args.save_dtype, general_rows=general_rows, general_target=general_target)
    print(json.dumps({k: summary[k] for k in ("output_dir", "drift", "export_drift", "quantize_s", "seconds")
                      if k in summary}, indent=2))
    return summary


def _run_w8a8(args) -> dict:
    """``--format w8a8``: merge, then int8 weights and activations, as a compressed-tensors checkpoint."""
    from qft.ptq import W8A8Config
    from qft.ptq.export import export_w8a8
    from qft.ptq.learned import learned_activation

    refused = [("--bits", args.bits not in (None, 8)), ("--group-size", args.group_size not in (None, -1)),
               ("--asym", bool(args.asym)), ("--layerwise", args.layerwise), ("--backend", args.backend != "qft"),
               ("--qat-grid refine", args.qat_grid == "refine"),
               ("--general-target", args.general_target is not None),
               ("--general-calibration", args.general_calibration is not None), ("--desc-act", args.desc_act),
               ("--calibration-offload", args.calibration_offload != "none"), ("--sparsity", args.sparsity > 0)]
    for flag, bad in refused:
        if bad:
            raise ValueError(f"qft export --format w8a8 cannot take {flag}: W8A8 is int8 symmetric per output "
                             f"channel, solved by qft in memory from task calibration only. Drop {flag}.")
    qat_grid = args.qat_grid or "keep"
    cfg = W8A8Config(activation=args.activation or "dynamic", smoothquant=args.smoothquant,
                     weight_method=args.method, damp_percent=args.damp_percent)
    check_merge_into(args.merge_into, "qft export")
    check_output_dir(args.output, args.overwrite)
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file (a text file is expected).")
    # only a Lightning checkpoint can hold what QAT learned (adapters cannot): elsewhere, fail before loading
    if cfg.needs_calibration and args.calibration is None and (not args.ckpt or qat_grid == "resolve"):
        raise CalibrationError(f"qft export --format w8a8: --calibration is required for --activation "
                               f"{cfg.activation}, --smoothquant or --method gptq (dynamic + rtn needs none).")
    if args.ckpt:
        model, tok, base_name, masks = _from_ckpt(args.ckpt, args.model, args.merge_into, args.allow_unsafe_load)
    else:
        model, tok, base_name, masks = _from_adapter(args.adapter, args.model, args.merge_into)
    if args.activation is None and qat_grid == "keep":
        cfg = replace(cfg, activation=learned_activation(model) or "dynamic")
    tokens = None
    if args.calibration is not None:
        tokens = calibration_mix(args.calibration, None, tok, args.n_samples, args.seq_len, 0.0,
                                 max_length=model_max_length(model))
    summary = export_w8a8(model, tok, tokens, args.output, cfg, base_name=base_name, merge_into=args.merge_into,
                          masks=masks, device=args.device, dtype=args.dtype, save_dtype=args.save_dtype,
                          overwrite=args.overwrite, qat_grid=qat_grid)
    print(json.dumps({k: summary[k] for k in ("output_dir", "seconds")}, indent=2))
    return summary


def _run_gguf(args) -> dict:
    """``--format gguf``: merge, then one llama.cpp file in the mix ``--quant`` names."""
    from .gguf import GGUFConfig, export_trained
    from .gguf.writer import check_output_file

    refused = [("--bits", args.bits is not None), ("--group-size", args.group_size is not None),
               ("--asym", bool(args.asym)), ("--layerwise", args.layerwise), ("--backend", args.backend != "qft"),
               ("--qat-grid " + str(args.qat_grid), args.qat_grid == "refine"),
               ("--general-target", args.general_target is not None),
               ("--general-calibration", args.general_calibration is not None), ("--desc-act", args.desc_act),
               ("--calibration-offload", args.calibration_offload != "none"), ("--sparsity", args.sparsity > 0),
               ("--activation", args.activation is not None), ("--smoothquant", args.smoothquant is not None),
               ("--mse", args.mse)]
    for flag, bad in refused:
        if bad:
            raise ValueError(f"qft export --format gguf cannot take {flag}: the GGUF mix (--quant) fixes each tensor's "
                             f"block format, solved by qft in memory from task calibration only. Drop {flag}.")
    if args.method not in GGUF_ALL_METHODS:
        raise ValueError(f"qft export --format gguf --method {args.method}: allowed {list(GGUF_ALL_METHODS)}.")
    cfg = GGUFConfig(quant=args.quant or "Q4_K_M", method=args.method, damp_percent=args.damp_percent)
    check_merge_into(args.merge_into, "qft export")
    check_output_file(args.output, args.overwrite)
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file (a text file is expected).")
    if cfg.needs_calibration and args.calibration is None:
        raise CalibrationError(f"qft export --format gguf: --calibration is required for --method {cfg.method} "
                               "(--method rtn reads none).")
    if args.ckpt:
        model, tok, base_name, masks = _from_ckpt(args.ckpt, args.model, args.merge_into, args.allow_unsafe_load)
    else:
        model, tok, base_name, masks = _from_adapter(args.adapter, args.model, args.merge_into)
    tokens = None
    if cfg.needs_calibration:
        tokens = calibration_mix(args.calibration, None, tok, args.n_samples, args.seq_len, 0.0,
                                 max_length=model_max_length(model))
    summary = export_trained(model, tok, tokens, args.output, cfg, base_name=base_name, merge_into=args.merge_into,
                             masks=masks, qat_grid=args.qat_grid or "keep", overwrite=args.overwrite,
                             device=args.device)
    print(json.dumps({k: summary[k] for k in ("output", "quant", "method", "bytes", "formats", "seconds")}, indent=2))
    return summary


def _check_layerwise(args) -> None:
    refused = [("--ckpt", bool(args.ckpt), "a Lightning checkpoint holds the whole trained model; save adapters "
                "(CausalLMModule(save_adapter=True)) and pass --adapter"),
               ("--backend gptqmodel", args.backend != "qft", "GPTQModel loads the whole model"),
               (f"--qat-grid {args.qat_grid}", args.qat_grid in ("keep", "refine"),
                "learned grids live in the trained model, not in the adapters"),
               ("--general-target base", args.general_target == "base", "the anchor needs every base weight")]
    for flag, bad, why in refused:
        if bad:
            raise ValueError(f"qft export --layerwise cannot take {flag}: {why}. Drop --layerwise, or {flag}.")
    if args.sparsity > 0:
        raise ValueError("qft export --layerwise cannot take --sparsity: pruning is not wired into the layer-wise "
                         "writer yet. Drop --layerwise.")
    if args.method in ("awq", "awq_gptq"):
        raise ValueError(f"qft export --layerwise cannot take --method {args.method}: AWQ's scale search runs on the "
                         "whole model in memory. Drop --layerwise.")
    if args.calibration is None and args.method == "gptq":
        raise ValueError("qft export --layerwise: --calibration is required for --method gptq.")


def _run_layerwise(args, grid: dict, solver: dict) -> dict:
    from qft import models

    from .layerwise import export_layerwise

    name, quantization = _adapter_base(args.adapter, args.model)
    tok = models.load_tokenizer(name)
    cfg = GPTQConfig(**{k: v for k, v in grid.items() if v is not None}, **solver)
    tokens = None
    if args.calibration is not None:
        tokens = calibration_mix(args.calibration, skip_start(args.general_calibration, args.general_start), tok,
                                 args.n_samples, args.seq_len, args.general_fraction,
                                 max_length=models.max_length(name))
    summary = export_layerwise(models.local_dir(name), args.output, cfg, tokens, adapter_dir=args.adapter,
                               base_quantization=quantization, merge_into=args.merge_into, tokenizer=tok,
                               overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                               save_dtype=args.save_dtype, reuse_outputs=not args.no_reuse_outputs,
                               calibration_offload=args.calibration_offload)
    print(json.dumps({k: summary[k] for k in ("output_dir", "seconds")}, indent=2))
    return summary


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="qft export", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
