"""The whole post-fit export in one function, shared by ``GPTQExportCallback`` and ``qft export``.

trained (NF4/bf16/fp + LoRA, QAT or not) --merge--> plain fp32 model --GPTQ/RTN, or the grid QAT
learned--> packed int weights --> HF checkpoint.

Every layer is read through ``qft.layers``, so the export does not care how the model was trained.
A layer QAT trained carries its grid (``qft.layers.grids``); ``qat_grid`` says what to do with it:

- ``"keep"`` (default): write exactly that grid, the codes, scales and zeros ``qft.qat.convert``
  computes; the checkpoint reproduces the fake-quant model in memory bit for bit, no solve;
- ``"refine"``: keep the learned scales and zeros, let GPTQ re-solve the codes on calibration data;
- ``"resolve"``: ignore it; merge and solve a new grid as for any model (Hugging Face's road).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from qft import layers
from qft.sparsity import is_sparse

from .blocks import check_model, find_decoder_blocks
from .calibration import CalibrationError
from .checkpoint import _swap_into_place, check_output_dir, save_quantized, work_dir
from .config import GPTQConfig
from .dtype import DTYPES, check_dtype_name
from .load import load_quantized
from .merge import DEFAULT_MERGE_INTO, check_merge_into, drift, merge_adapters
from .offload import check_offload
from .sequential import quantize_model
from .verify import Reference, check_tokens, check_written, kl_limit

QAT_GRIDS = ("keep", "refine", "resolve")
GENERAL_TARGETS = ("trained", "base")
BACKENDS = ("qft", "gptqmodel")


def gptqmodel_available() -> bool:
    try:
        import gptqmodel  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed: {list(BACKENDS)}.")
    if backend == "gptqmodel" and not gptqmodel_available():
        raise ImportError("backend='gptqmodel' needs GPTQModel: pip install 'qft[interop]' (torch>=2.14.1), or use "
                          "backend='qft' (pure torch, no extra dependency).")


def resolve_dtype(name: str, device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown; allowed: {list(DTYPES)}.")
    if DTYPES[name] is not None:
        return DTYPES[name]
    from qft.module import bf16_supported

    return torch.bfloat16 if bf16_supported(device) else torch.float32


def road(qat_grid: str | None, general_target: str | None, general_rows: int, n_rows: int,
         where: str = "export", backend: str = "qft") -> tuple[str, str]:
    """Resolve ``(qat_grid, general_target)``; None picks the measured default (BENCHMARKS.md, export roads).

    With general text among the calibration windows (``0 < general_rows < n_rows``) the solve reproduces
    the released base on it and the fine-tune on the task (``general_target="base"``), and a learned QAT
    grid keeps its scales while GPTQ re-solves its codes toward both targets (``qat_grid="refine"``): on
    SmolLM2-135M that kept the task accuracy of the QAT model and the base's WikiText-2 perplexity.
    Without general text there is nothing to anchor: plain GPTQ, and a learned grid is written as it is.
    """
    anchored = 0 < general_rows < n_rows
    if general_target is None:
        general_target = "base" if anchored else "trained"
    if general_target not in GENERAL_TARGETS:
        raise ValueError(f"{where}(general_target={general_target!r}) is unknown; allowed: {list(GENERAL_TARGETS)} "
                         "or None ('trained': reproduce the fine-tune everywhere; 'base': the released base on "
                         "general text).")
    if general_target == "base" and not anchored:
        raise ValueError(f"{where}(general_target='base') needs general text in the calibration set, next to the "
                         f"task ({general_rows} of {n_rows} windows are general); give general_calibration with a "
                         "general_fraction in (0, 1), or use general_target='trained'.")
    if general_target == "base" and backend != "qft":
        raise ValueError(f"{where}(general_target='base', backend={backend!r}): only qft's GPTQ anchors general text "
                         "to the base; use backend='qft' or general_target='trained'.")
    if qat_grid is None:
        qat_grid = "refine" if general_target == "base" else "keep"
    check_qat_grid(qat_grid)
    return qat_grid, general_target


def check_qat_grid(qat_grid: str) -> None:
    if qat_grid not in QAT_GRIDS:
        raise ValueError(f"qat_grid={qat_grid!r} is unknown; allowed: {list(QAT_GRIDS)} ('keep': write the grid QAT "
                         "learned; 'refine': keep its scales, GPTQ re-solves the codes; 'resolve': solve a new grid).")


def export_config(trained, qat_grid: str = "keep", bits: int | None = None, group_size: int | None = None,
                  sym: bool | None = None, **solver) -> GPTQConfig:
    """The export's ``GPTQConfig``: bits, group size and symmetry follow the grid QAT trained, if any.

    ``bits``/``group_size``/``sym`` left as None take QAT's values (or ``GPTQConfig``'s defaults for a
    model without QAT). Given ones must agree with a learned grid that is kept or refined; with
    ``qat_grid="resolve"`` they may differ (a new grid is solved anyway).
    """
    check_qat_grid(qat_grid)
    explicit = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym).items() if v is not None}
    scheme = layers.learned_scheme(layers.unwrap(trained))
    if scheme is None:
        return GPTQConfig(**explicit, **solver)
    learned = GPTQConfig.from_scheme(scheme)
    clash = {k: (v, getattr(learned, k)) for k, v in explicit.items() if getattr(learned, k) != v}
    if clash and qat_grid != "resolve":
        raise ValueError(f"export: {', '.join(f'{k}={v!r}' for k, (v, _) in clash.items())} differ from the grid QAT "
                         f"trained ({', '.join(f'{k}={w!r}' for k, (_, w) in clash.items())}). Leave them unset to "
                         "write the learned grid, or set qat_grid='resolve' to solve a new grid instead.")
    return GPTQConfig(**{"bits": learned.bits, "group_size": learned.group_size, "sym": learned.sym,
                         **explicit, **solver})


def check_trained(trained, cfg: GPTQConfig, qat_grid: str = "keep", backend: str = "qft") -> dict:
    """Refuse, before any work, a trained model that cannot be exported as asked; returns its learned grids."""
    check_qat_grid(qat_grid)
    model = layers.unwrap(trained)
    find_decoder_blocks(model)
    under = layers.grid_under_adapter(model)
    if under and qat_grid != "resolve":
        raise ValueError(f"export: {len(under)} layers (e.g. {under[0]}) hold a QAT grid under a LoRA adapter that "
                         "adds outside it (QATCallback(lora_merged=False)); the merged weight W + B@A that an export "
                         "writes was never on a trained grid. Train with QATCallback(lora_merged=True) (the default), "
                         "or export with qat_grid='resolve' (merge, then solve a new grid).")
    grids = layers.grids(model) if qat_grid != "resolve" else {}
    if grids and cfg.awq:
        raise ValueError(f"export: method={cfg.method!r} rescales every weight before rounding, so it cannot write the "
                         f"grid QAT learned ({len(grids)} layers, e.g. {next(iter(grids))}). Use method='gptq' or "
                         "'rtn' to keep or refine it, or qat_grid='resolve' to run AWQ on the merged weights.")
    if grids and cfg.pruning:
        raise ValueError(f"export: sparsity={cfg.sparsity} prunes weights, so it cannot write the grid QAT learned "
                         f"({len(grids)} layers); set qat_grid='resolve' to prune and solve the merged weights.")
    if (cfg.awq or cfg.pruning) and backend != "qft":
        raise ValueError(f"export: method={cfg.method!r}, sparsity={cfg.sparsity} run in qft's engine; use "
                         "backend='qft'.")
    if grids and backend != "qft":
        raise ValueError(f"export: backend={backend!r} solves its own grid and cannot write the one QAT learned; use "
                         "backend='qft', or qat_grid='resolve'.")
    for name, qw in grids.items():
        if qw.bits != cfg.bits or qw.group_size != cfg.group_size:
            raise ValueError(f"export: layer {name} was trained on a {qw.bits}-bit grid with group size "
                             f"{qw.group_size}, but the export asks for bits={cfg.bits}, group_size={cfg.group_size}; "
                             "build the config with qft.export.pipeline.export_config, or qat_grid='resolve'.")
    return grids


def needs_calibration(trained, cfg: GPTQConfig, qat_grid: str = "keep") -> bool:
    """Whether the export solves anything (and so needs calibration tokens)."""
    if cfg.method == "rtn" or cfg.method == "none" and cfg.prune_method == "magnitude":
        return False
    if qat_grid == "refine":
        return True
    model = layers.unwrap(trained)
    prefix, blocks = find_decoder_blocks(model)
    grids = layers.grids(model) if qat_grid == "keep" else {}
    return not all(f"{prefix}.{i}.{n}" in grids for i, b in enumerate(blocks) for n in layers.linear_layers(b))


def export(trained, tokenizer, tokens: torch.Tensor | None, output_dir, cfg: GPTQConfig, base_name: str | None = None,
           merge_into: str = DEFAULT_MERGE_INTO, masks=None, backend: str = "qft", device=None, dtype: str = "auto",
           overwrite: bool = False, measure_drift: bool = True, progress: bool = True,
           qat_grid: str | None = None, save_dtype: str = "auto", general_rows: int = 0,
           general_target: str | None = None, reuse_outputs: bool = True,
           calibration_offload: str = "none") -> dict:
    """Merge, quantize and write ``output_dir``; returns a summary (also saved as ``qft_export.json``).

    ``save_dtype`` is the dtype of the tensors that stay in floating point (embeddings, norms, head):
    ``"auto"`` is one the model runs correctly in (``qft.export.dtype``: fp16 where one batch through the
    written checkpoint stays finite and close, else bf16). Before the rename, the written checkpoint is
    loaded as a user loads it and checked on one batch against the trained model (``qft.export.verify``).
    ``general_rows``: how many trailing rows of ``tokens`` are general text (``calibration_mix`` puts them
    last). ``qat_grid`` and ``general_target`` default (None) to the measured road (``road``).
    ``general_target`` is what the export reproduces on general rows: ``"trained"`` (the fine-tuned
    model, as on the task rows: plain GPTQ) or ``"base"`` (the base model as released: the solve keeps
    the fine-tune's task behaviour on task inputs and the base's general ability on general text; see
    ``qft.export.sequential.quantize_model(anchor=...)``).
    ``reuse_outputs=False``: recompute sub-module outputs in a block instead of keeping them (less memory,
    more time; ``quantize_model``). ``calibration_offload``: where the cached calibration activations wait,
    ``"none"`` (on ``device``), ``"cpu"`` or ``"disk"`` (``qft.export.offload``).
    ``drift`` compares the merged full-precision model with the trained one (what the merge changed),
    ``export_drift`` the quantized model with the trained one (what the whole export changed; zero up to
    the export dtype when a learned grid is kept). Both need ``tokens``.
    """
    check_offload(calibration_offload, backend=backend)
    check_backend(backend)
    check_output_dir(output_dir, overwrite)
    check_dtype_name(save_dtype)
    merge_into = check_merge_into(merge_into)
    qat_grid, general_target = road(qat_grid, general_target, general_rows, 0 if tokens is None else len(tokens),
                                    backend=backend)
    if general_target == "base" and base_name is None:
        raise ValueError("general_target='base' needs the base model (base_name=...).")
    fixed = check_trained(trained, cfg, qat_grid, backend)
    solves = needs_calibration(trained, cfg, qat_grid)
    if tokens is None and solves:
        raise CalibrationError("export: GPTQ needs calibration tokens for the layers QAT did not train; pass some.")
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    was_training = trained.training
    trained.eval()
    hf = layers.unwrap(trained)
    model = merge_adapters(trained, base_name, merge_into=merge_into, masks=masks)
    # What the written file must stay close to: the model as trained, or, when the adapters were merged into
    # the original base instead (Hugging Face's recipe), that merged model, which differs from the trained
    # one by design (the base the adapters did not train on) and is measured apart, as "drift".
    ref = Reference(hf if merge_into == "trained" else model, check_tokens(tokens, tokenizer, hf.config.vocab_size))
    found = layers.linear_layers(layers.unwrap(trained)).values()
    summary = {"merge_into": merge_into, "general_target": general_target, "general_rows": general_rows,
               "merged_layers": sum(1 for m in found if layers.adapters(m)),
               "qat_grid": qat_grid if fixed or qat_grid == "resolve" and layers.grids(trained) else None,
               "learned_layers": len(fixed), "masks": len(masks or {}), "backend": backend, "config": cfg.to_dict(),
               "calibration": None if tokens is None else list(tokens.shape)}
    measure = measure_drift and tokens is not None
    if measure:
        summary["drift"] = drift(trained, model, tokens)
    compute = resolve_dtype(dtype, device) if solves else torch.float32  # kept grids need no forward pass:
    for p in model.parameters():  # the merged fp32 model is written as it is, bit for bit. Parameters only:
        p.data = p.data.to(compute)  # .to() would also round the rotary inv_freq buffer to bf16, and with it
    # every calibration position's angle (off by ~0.5 rad at position 512 for a frequency near 0.75)
    summary["dtype"] = str(compute).replace("torch.", "")
    summary["group_size_warnings"] = check_model(model, cfg)
    t1 = time.perf_counter()
    if backend == "qft":
        anchor = base_weights(base_name) if general_target == "base" else None
        quantized, rows = quantize_model(model, cfg, tokens, device=device, progress=progress, fixed=fixed,
                                         reuse_outputs=reuse_outputs, calibration_offload=calibration_offload,
                                         refine=qat_grid == "refine", anchor=anchor,
                                         anchor_rows=general_rows if anchor else 0, keep_zeros=is_sparse(trained))
        del anchor
        summary["quantize_s"] = time.perf_counter() - t1
        if measure:
            summary["export_drift"] = drift(trained, model, tokens)
        trained.train(was_training)
        refused = sorted(r["layer"] for r in rows if r.get("awq_fold_refused"))
        if cfg.awq:
            summary.update(folds_refused=len(refused), unscaled_layers=refused)
        summary["seconds"] = time.perf_counter() - t0
        limit = kl_limit(cfg.bits if cfg.method != "none" else 16, cfg.sparsity if cfg.pruning else 0.0)

        out = save_quantized(model, quantized, cfg, output_dir, tokenizer=tokenizer, overwrite=overwrite,
                             dtype=DTYPES[save_dtype], report_rows=rows, extra_files={"qft_export.json": summary},
                             verify=lambda tmp, d: check_written(load_quantized(tmp, device, d), ref, limit,
                                                                 "export", d))
    else:
        trained.train(was_training)
        out = _export_gptqmodel(model, tokenizer, tokens, output_dir, cfg, overwrite, summary, t0, t1)
    summary["output_dir"] = str(out)
    return summary


def base_weights(base_name: str) -> dict[str, torch.Tensor]:
    """fp32 weights of every linear layer of the released base model, by layer name."""
    from qft.models import load_model

    base = load_model(base_name, dtype=torch.float32)
    return {n: layers.base_weight(m) for n, m in layers.linear_layers(base).items()}


def _export_gptqmodel(model, tokenizer, tokens, output_dir, cfg, overwrite, summary, t0, t1):
    """Hand the merged model to GPTQModel (its own solver and packing), with the same grid settings."""
    from gptqmodel import GPTQModel, QuantizeConfig

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = work_dir(out, "gptqmodel")
    try:
        model.save_pretrained(work / "fp")
        if tokenizer is not None:
            tokenizer.save_pretrained(work / "fp")
        qc = QuantizeConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act,
                            true_sequential=cfg.true_sequential, damp_percent=cfg.damp_percent,
                            act_group_aware=cfg.act_group_aware)
        gm = GPTQModel.load(str(work / "fp"), qc, dtype=next(model.parameters()).dtype, device="cpu")
        gm.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in tokens])
        summary["quantize_s"] = time.perf_counter() - t1
        summary["seconds"] = time.perf_counter() - t0
        gm.save(str(work / "q"))
        (work / "q" / "qft_export.json").write_text(json.dumps(summary, indent=2))
        check_output_dir(out, overwrite)
        _swap_into_place(work / "q", out, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
