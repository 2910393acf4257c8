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

import torch

from qft.quant.ggml import FORMATS, BlockGrid, choose_grid, pack, quantize

from ..config import GPTQConfig
from ..sequential import quantize_model
from ..verify import Reference, check_tokens, check_written, kl_limit
from .config import GGUFConfig
from .mix import FLOAT, tensor_types
from .writer import (
    check_architecture,
    check_output_file,
    copy_tokenizer,
    gguf_name,
    hyperparameters,
    rotary_rows,
    tokenizer_from_hf,
    write_gguf,
)


def file_type(quant: str) -> int:
    """``general.file_type``: gguf's own ``LlamaFileType`` of the mix."""
    import gguf

    return int(getattr(gguf.LlamaFileType, "ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"))


def shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    """``[(Hugging Face parameter name, shape)]`` of the plain model ``model`` merges into, read from any
    form of it (LoRA, NF4, QAT layers answer through ``qft.layers``)."""
    from qft import layers

    hf = layers.unwrap(model)
    lin = layers.linear_layers(hf)
    out, seen = [], set()
    for n, p in hf.named_parameters():
        owner = n.rsplit(".", 1)[0]
        while owner and owner not in lin:
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        if not owner:
            out.append((n, tuple(p.shape)))
        elif owner not in seen:
            seen.add(owner)
            out.append((owner + ".weight", (lin[owner].out_features, lin[owner].in_features)))
    return out


def plan(model, cfg: GGUFConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``[(hf name, gguf name)]`` in file order and ``{gguf name: format}``; refuses what llama.cpp
    could not read before any work."""
    from qft import layers

    hf = layers.unwrap(model)
    check_architecture(hf)
    n_blocks = hf.config.num_hidden_layers
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    found = [(n, s) for n, s in shapes(model) if not (tied and n.endswith("lm_head.weight"))]
    names = [(n, gguf_name(n, n_blocks)) for n, _ in found]
    types = tensor_types(cfg.quant, [(g, s) for (_, g), (_, s) in zip(names, found)])
    odd = [g for g, t in types.items() if t == "F16" and cfg.quant not in FLOAT]
    if odd:
        raise ValueError(f"GGUF export(quant={cfg.quant!r}): {odd[:3]} have rows that no 32-weight block divides; "
                         "llama.cpp would keep them F16. Export F16 or GPTQ instead.")
    return names, types


# QAT grids that are GGUF block formats: qft's symmetric grid, scale * (q - 2**(bits-1)) with one fp16
# scale per 32 inputs, is Q4_0 at 4 bits and Q8_0 at 8 (qft.quant.grid; ggml's d * (q - 8), d * int8)
KEEPABLE = {"Q4_0": (4, 32), "Q8_0": (8, 32)}


def keeps_grid(scheme, quant: str) -> bool:
    """Whether a QAT weight scheme is the block format the mix ``quant`` writes for every decoder linear."""
    want = KEEPABLE.get(quant)
    return want is not None and scheme.symmetric and scheme.granularity == "per_group" and \
        (scheme.bits, scheme.group_size) == want


def fixed_block_grid(qw, fmt: str) -> BlockGrid:
    """A learned ``QuantizedWeight`` (Q4_0/Q8_0's shape, see ``KEEPABLE``) as the block grid it already is."""
    f = FORMATS[fmt]
    if (qw.bits, qw.group_size) != (f.bits, f.block) or not torch.equal(qw.zero, torch.full_like(qw.zero, f.zero)) \
            or not torch.equal(qw.g_idx.long(), torch.arange(qw.codes.shape[1]) // f.block):
        raise ValueError(f"GGUF export: a learned {qw.bits}-bit group-{qw.group_size} grid is not {fmt}'s; "
                         "use qat_grid='resolve'.")
    d = qw.scale.float()
    if not torch.equal(d.half().float(), d):
        raise ValueError(f"GGUF export: learned scales are not fp16 values, which {fmt} stores; "
                         "use qat_grid='resolve'.")
    return BlockGrid(f, d)


def export_gguf(model, tokenizer, tokens: torch.Tensor | None, output, cfg: GGUFConfig | None = None,
                source_gguf=None, overwrite: bool = False, device=None, progress: bool = True,
                fixed: dict | None = None, reference=None) -> dict:
    """Write ``model`` (a Llama-architecture causal LM, adapters merged) to ``output`` (``.gguf``).

    ``tokens`` are the calibration windows (``qft.export.calibration``), needed unless
    ``cfg.method == "rtn"`` or the quant is F16/F32. ``source_gguf``: the GGUF file the model was
    converted from, whose tokenizer keys are copied (``tokenizer_pre="auto"``). The model's decoder
    linears are left holding their dequantized weights. Returns a summary (formats, bytes, seconds).

    ``fixed`` (``{HF layer name: QuantizedWeight}``, what QAT learned, ``qft.layers.grids``) writes those
    codes and scales as they are: every decoder linear's format must be the grid's (``keeps_grid``).

    Before the rename, the file is read back (``load_gguf``) and checked on one batch against
    ``reference`` (``qft.export.verify.Reference``; by default ``model`` before rounding).
    """
    cfg = cfg or GGUFConfig()
    check_output_file(output, overwrite)
    names, types = plan(model, cfg)
    if cfg.needs_calibration and tokens is None and not fixed:
        raise ValueError(f"GGUF export(method={cfg.method!r}) needs calibration tokens (qft.export.calibration); "
                         "or use method='rtn', which reads none.")
    source = Path(source_gguf) if source_gguf is not None and cfg.tokenizer_pre == "auto" else None
    if source is None and tokenizer is None:
        raise ValueError("GGUF export: llama.cpp needs the tokenizer in the file; pass tokenizer= (a Hugging Face "
                         "BPE tokenizer) or source_gguf= (the GGUF the model came from, qft.models.source_gguf).")
    t0 = time.perf_counter()
    ref = reference or Reference(model, check_tokens(tokens, tokenizer, model.config.vocab_size))
    cfg_by_name = dict(names)
    grids: dict[str, BlockGrid] = {}
    quantized, rows = {}, []
    if fixed:
        for layer, qw in fixed.items():
            grids[layer] = fixed_block_grid(qw, types[cfg_by_name[layer + ".weight"]])
            quantized[layer] = qw
        decoder = [hf[:-len(".weight")] for hf, g in names if g.startswith("blk.") and types[g] not in FLOAT]
        missing = sorted(set(decoder) - set(quantized))
        if missing:
            raise ValueError(f"GGUF export: QAT trained {len(quantized)} of {len(decoder)} decoder linears (not "
                             f"{missing[:2]}...); keeping learned grids needs all of them. Use qat_grid='resolve'.")
        rows = [dict(layer=n, method="qat", bits=q.bits, group_size=q.group_size) for n, q in quantized.items()]
    elif cfg.quant not in FLOAT:
        def grid_for(name, W, H):
            grid = choose_grid(W.detach(), types[cfg_by_name[name + ".weight"]],
                               None if H is None or cfg.method == "rtn" else torch.diag(H))
            grids[name] = grid.cpu()  # packed on the CPU, beside the codes quantize_model returns there
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
            data = params[hf].detach().float().cpu()
        else:  # embedding / output: no calibration inputs reach them as a linear's would
            W = params[hf].detach().float().cpu()
            codes, grid = quantize(W, fmt)
            data = pack(codes, grid)
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(g.split(".")[-2])
        if heads is not None:
            data = data[rotary_rows(data.shape[0], heads)]
        if fmt in FLOAT:
            tensors.append((g, data.to(torch.float16 if fmt == "F16" else torch.float32).numpy(), None))
        else:
            tensors.append((g, data.contiguous().numpy(), _qtype(fmt)))

    pre = "default" if cfg.tokenizer_pre == "auto" else cfg.tokenizer_pre

    def metadata(writer):
        hyperparameters(writer, config, file_type(cfg.quant), getattr(config, "_name_or_path", "") or "qft")
        if source is not None:
            copy_tokenizer(writer, source)
        else:
            tokenizer_from_hf(writer, tokenizer, pre)
        writer.add_string("qft.gguf.method", cfg.method)

    found = {}

    def verify(tmp):
        found.update(check_written(load_gguf(tmp), ref, kl_limit(quant_bits(cfg.quant)), "GGUF export"))

    out = write_gguf(output, tensors, metadata, overwrite, verify=verify)
    return {"output": str(out), "quant": cfg.quant, "method": cfg.method, "bytes": out.stat().st_size,
            "formats": dict(Counter(types.values())), "seconds": round(time.perf_counter() - t0, 2),
            "solve_seconds": round(t_solve, 2), "check": found, "layers": rows}


def quant_bits(quant: str) -> int:
    """The nominal weight bits of a mix (``Q4_K_M`` -> 4; ``F16`` -> 16), for its check's limit."""
    return 16 if quant in FLOAT else int(quant[1])


def _qtype(fmt: str):
    import gguf

    assert fmt in FORMATS
    return getattr(gguf.GGMLQuantizationType, fmt)


QAT_GRIDS = ("keep", "resolve")


def check_trained(trained, qat_grid: str = "keep", where: str = "GGUF export", quant: str = "Q4_K_M") -> None:
    """Refuse, before any work, what a GGUF file cannot be written from: a non-Llama architecture, or
    a grid QAT learned that the mix ``quant`` cannot hold (only Q4_0 and Q8_0 are QAT grids, see
    ``KEEPABLE``) unless ``qat_grid="resolve"`` asks to round the merged weights to the mix anew."""
    from qft import layers

    if qat_grid not in QAT_GRIDS:
        raise ValueError(f"{where}(qat_grid={qat_grid!r}) is unknown; allowed: {list(QAT_GRIDS)} ('resolve' rounds "
                         "a QAT-trained model's merged weights to the GGUF mix anew).")
    hf = layers.unwrap(trained)
    check_architecture(hf)
    scheme = layers.learned_scheme(hf)
    if scheme is None or qat_grid == "resolve":
        return
    if not keeps_grid(scheme, quant):
        raise ValueError(f"{where}: the model was trained by QAT on a {scheme.bits}-bit "
                         f"{'group-' + str(scheme.group_size) if scheme.granularity == 'per_group' else 'per-channel'} "
                         f"{'symmetric' if scheme.symmetric else 'asymmetric'} grid, which no GGUF block format of "
                         f"the {quant} mix holds, so the file could not keep it bit for bit. Train on "
                         "QuantScheme(bits=4, group_size=32) for Q4_0 (bits=8 for Q8_0), which are GGUF's own grids; "
                         "or pass qat_grid='resolve' (CLI: --qat-grid resolve) to round the merged weights to the mix "
                         "anew; or export GPTQ, which keeps the learned grid.")
    under = layers.grid_under_adapter(hf)
    if under:
        raise ValueError(f"{where}: {len(under)} layers (e.g. {under[0]}) have a learned grid under an unmerged LoRA "
                         "adapter, so their merged weight is on no grid; train QAT with lora_merged=True or use "
                         "qat_grid='resolve'.")


def export_trained(trained, tokenizer, tokens, output, cfg: GGUFConfig, base_name: str | None = None,
                   merge_into: str = "trained", masks=None, qat_grid: str = "keep", overwrite: bool = False,
                   device=None, progress: bool = True) -> dict:
    """Merge ``trained`` (plain, LoRA, NF4+LoRA, QAT) into a plain model (``qft.export.merge``) and write
    it as GGUF; the road ``GGUFExportCallback`` and ``qft export --format gguf`` share."""
    from qft.models import source_gguf

    from ..merge import check_merge_into, merge_adapters

    if not isinstance(cfg, GGUFConfig):
        raise TypeError(f"export_trained(cfg={cfg!r}): expected a qft.export.gguf.GGUFConfig.")
    from qft import layers

    merge_into = check_merge_into(merge_into)
    check_trained(trained, qat_grid, quant=cfg.quant)
    check_output_file(output, overwrite)
    fixed = layers.grids(trained) if qat_grid == "keep" else {}
    if cfg.needs_calibration and tokens is None and not fixed:
        raise ValueError(f"GGUF export(method={cfg.method!r}) needs calibration tokens; pass some (qft export "
                         "--calibration FILE), or use method='rtn'.")
    was_training = trained.training
    trained.eval()
    hf = layers.unwrap(trained)
    ref = Reference(hf, check_tokens(tokens, tokenizer, hf.config.vocab_size))  # the model as trained
    model = merge_adapters(trained, base_name, merge_into=merge_into, masks=masks)
    trained.train(was_training)
    summary = export_gguf(model, tokenizer, tokens, output, cfg, source_gguf=source_gguf(base_name),
                          overwrite=overwrite, device=device, progress=progress, fixed=fixed, reference=ref)
    summary.update(output_dir=summary["output"], merge_into=merge_into, qat_grid=qat_grid)
    return summary


def load_gguf(path, dtype=torch.float32):
    """A GGUF file back as a plain transformers model (weights dequantized by gguf-py), to evaluate or
    compare what was written without llama.cpp."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
