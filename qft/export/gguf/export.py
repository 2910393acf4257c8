"""``export_gguf``: a merged model to one GGUF file, rounded with calibration data.

Lifecycle: check the architecture, the output path and the mix (before any work); choose each
tensor's format (``mix``); run the sequential calibration of ``qft.export.sequential`` with a
``grid_for`` that picks each decoder linear's block grid from its weight and its inputs' Hessian
(``qft.quant.ggml``), and with ``method="gptq"`` let GPTQ solve the codes inside it; round the
embedding and output matrices (no calibration inputs: uniform weights); pack and write atomically.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from qft.quant.ggml import FORMATS, BlockGrid, choose_grid, pack

from ..config import GPTQConfig
from ..sequential import quantize_model
from .config import GGUFConfig
from .mix import FLOAT, tensor_types
from .writer import (check_architecture, check_output_file, copy_tokenizer, gguf_name, hyperparameters, rotary_rows,
                     tokenizer_from_hf, write_gguf)

FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def plan(model, cfg: GGUFConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``[(hf name, gguf name)]`` in file order and ``{gguf name: format}``; refuses what llama.cpp
    could not read before any work."""
    check_architecture(model)
    n_blocks = model.config.num_hidden_layers
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = [(n, gguf_name(n, n_blocks)) for n, _ in model.named_parameters()
             if not (tied and n.endswith("lm_head.weight"))]
    shapes = dict(model.named_parameters())
    types = tensor_types(cfg.quant, [(g, tuple(shapes[n].shape)) for n, g in names])
    odd = [g for g, t in types.items() if t == "F16" and cfg.quant not in FLOAT]
    if odd:
        raise ValueError(f"GGUF export(quant={cfg.quant!r}): {odd[:3]} have rows that no 32-weight block divides; "
                         "llama.cpp would keep them F16. Export F16 or GPTQ instead.")
    return names, types


def export_gguf(model, tokenizer, tokens: torch.Tensor | None, output, cfg: GGUFConfig | None = None,
                source_gguf=None, overwrite: bool = False, device=None, progress: bool = True) -> dict:
    """Write ``model`` (a Llama-architecture causal LM, adapters merged) to ``output`` (``.gguf``).

    ``tokens`` are the calibration windows (``qft.export.calibration``), needed unless
    ``cfg.method == "rtn"`` or the quant is F16/F32. ``source_gguf``: the GGUF file the model was
    converted from, whose tokenizer keys are copied (``tokenizer_pre="auto"``). The model's decoder
    linears are left holding their dequantized weights. Returns a summary (formats, bytes, seconds).
    """
    cfg = cfg or GGUFConfig()
    check_output_file(output, overwrite)
    names, types = plan(model, cfg)
    if cfg.needs_calibration and tokens is None:
        raise ValueError(f"GGUF export(method={cfg.method!r}) needs calibration tokens (qft.export.calibration); "
                         "or use method='rtn', which reads none.")
    t0 = time.perf_counter()
    cfg_by_name = dict(names)
    grids: dict[str, BlockGrid] = {}
    quantized, rows = {}, []
    if cfg.quant not in FLOAT:
        def grid_for(name, W, H):
            grid = choose_grid(W.detach(), types[cfg_by_name[name + ".weight"]],
                               None if H is None or cfg.method == "rtn" else torch.diag(H))
            grids[name] = grid
            return grid.quantized(grid.codes(W.detach()))

        gcfg = GPTQConfig(bits=4, group_size=32, method="rtn" if cfg.method == "rtn" else "gptq",
                          damp_percent=cfg.damp_percent, act_group_aware=cfg.act_group_aware)
        with torch.no_grad():
            quantized, rows = quantize_model(model, gcfg, tokens if cfg.method != "rtn" else None, device=device,
                                             progress=progress, refine=cfg.method == "gptq", grid_for=grid_for)
    t_solve = time.perf_counter() - t0

    config = model.config
    params = dict(model.named_parameters())
    tensors = []
    for hf, g in names:
        fmt = types[g]
        layer = hf[:-len(".weight")]
        if layer in quantized:
            data = pack(quantized[layer].codes, grids[layer])
        elif fmt in FLOAT:
            data = params[hf].detach().float()
        else:  # embedding / output: no calibration inputs reach them as a linear's would
            W = params[hf].detach().float()
            codes, grid = _rtn(W, fmt)
            data = pack(codes, grid)
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(g.split(".")[-2])
        if heads is not None:
            data = data[rotary_rows(data.shape[0], heads)]
        if fmt in FLOAT:
            tensors.append((g, data.to(torch.float16 if fmt == "F16" else torch.float32).numpy(), None))
        else:
            tensors.append((g, data.contiguous().numpy(), _qtype(fmt)))

    source = Path(source_gguf) if source_gguf is not None and cfg.tokenizer_pre == "auto" else None
    pre = "default" if cfg.tokenizer_pre == "auto" else cfg.tokenizer_pre

    def metadata(writer):
        hyperparameters(writer, config, FILE_TYPES[cfg.quant], getattr(config, "_name_or_path", "") or "qft")
        if source is not None:
            copy_tokenizer(writer, source)
        else:
            tokenizer_from_hf(writer, tokenizer, pre)
        writer.add_string("qft.gguf.method", cfg.method)

    out = write_gguf(output, tensors, metadata, overwrite)
    return {"output": str(out), "quant": cfg.quant, "method": cfg.method, "bytes": out.stat().st_size,
            "formats": dict(Counter(types.values())), "seconds": round(time.perf_counter() - t0, 2),
            "solve_seconds": round(t_solve, 2), "layers": rows}


def _rtn(W: torch.Tensor, fmt: str):
    grid = choose_grid(W, fmt)
    return grid.codes(W), grid


def _qtype(fmt: str):
    import gguf

    assert fmt in FORMATS
    return getattr(gguf.GGMLQuantizationType, fmt)


def dequantized_state(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 (gguf-py's own dequantization): a check independent of qft's."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
