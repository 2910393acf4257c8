"""``export_w8a8``: from a trained model to a W8A8 compressed-tensors checkpoint in one call.

The same road as the GPTQ export (``qft.export.pipeline.export``): the adapters are merged into the
base they trained on (``qft.export.merge``), then ``quantize_w8a8`` and ``save_w8a8`` run. Arguments
are checked, and the output directory too, before the model is touched.
"""
from __future__ import annotations

import time

import torch

from qft import layers
from qft.export.calibration import CalibrationError
from qft.export.checkpoint import check_output_dir
from qft.export.dtype import DTYPES, check_dtype_name
from qft.export.merge import DEFAULT_MERGE_INTO, check_merge_into, merge_adapters
from qft.export.pipeline import resolve_dtype
from qft.export.verify import Reference, check_tokens, check_written, kl_limit

from .config import W8A8Config
from .learned import learned_w8a8
from .model import needs_calibration, quantize_w8a8


def export_w8a8(trained, tokenizer, tokens: torch.Tensor | None, output_dir, cfg: W8A8Config,
                base_name: str | None = None, merge_into: str = DEFAULT_MERGE_INTO, masks=None, device=None,
                dtype: str = "auto", save_dtype: str = "auto", overwrite: bool = False, progress: bool = True,
                qat_grid: str = "keep") -> dict:
    """Merge ``trained`` (a plain, LoRA or NF4+LoRA model), quantize it to W8A8 and write ``output_dir``.

    ``dtype``: the precision of the weight solve and the calibration passes (``auto``: bf16 where
    supported); ``save_dtype``: of the tensors left in floating point (``auto``: one the model runs
    correctly in, ``qft.export.dtype``). Before the rename the written checkpoint is loaded as a user
    loads it and checked on one batch against the trained model (``qft.export.verify``). ``qat_grid``:
    for a model trained with ``QATCallback`` on an int8 per-channel grid (and ``activation=``),
    ``"keep"`` writes the codes, scales and static input ranges it learned, so the checkpoint computes
    what the fake-quant model computed; ``"resolve"`` quantizes the merged weights anew
    (``qft.ptq.learned``). Returns the summary, also written as ``qft_export.json``.
    """
    from .checkpoint import load_w8a8, save_w8a8

    if not isinstance(cfg, W8A8Config):
        raise TypeError(f"export_w8a8(cfg={cfg!r}): expected a qft.ptq.W8A8Config.")
    for arg, value in (("dtype", dtype), ("save_dtype", save_dtype)):
        check_dtype_name(value, arg, "export_w8a8")
    merge_into = check_merge_into(merge_into)
    fixed, input_scales = learned_w8a8(trained, cfg, qat_grid)
    solves = needs_calibration(layers.unwrap(trained), cfg, fixed, input_scales)
    if solves and tokens is None:
        raise CalibrationError(f"export_w8a8: activation={cfg.activation!r}, smoothquant={cfg.smoothquant!r}, "
                               f"weight_method={cfg.weight_method!r} measure layers that QAT did not train, so they "
                               "need calibration tokens; pass some (qft export --calibration FILE).")
    check_output_dir(output_dir, overwrite)
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    was_training = trained.training
    trained.eval()
    hf = layers.unwrap(trained)
    ref = Reference(hf, check_tokens(tokens, tokenizer, hf.config.vocab_size))  # the model as trained
    model = merge_adapters(trained, base_name, merge_into=merge_into, masks=masks)
    trained.train(was_training)
    compute = resolve_dtype(dtype, device) if solves else torch.float32  # nothing measured: write the merged
    # fp32 weights and the kept grids as they are (as the GPTQ export does for a kept grid)
    summary = quantize_w8a8(model, cfg, tokens, device=device, progress=progress, compute_dtype=compute,
                            fixed=fixed, input_scales=input_scales)
    rows = summary.pop("rows")
    summary.update(merge_into=merge_into, qat_grid=qat_grid if fixed or input_scales else None,
                   dtype=str(compute).replace("torch.", ""),
                   calibration=None if tokens is None else list(tokens.shape), seconds=time.perf_counter() - t0)
    written = {**summary, "layers_report": rows}
    out = save_w8a8(model, output_dir, cfg, tokenizer=tokenizer, overwrite=overwrite, dtype=DTYPES[save_dtype],
                    extra_files={"qft_export.json": written},
                    verify=lambda tmp, d: check_written(load_w8a8(tmp, d), ref, kl_limit(8), "export_w8a8", d))
    summary.update({k: written[k] for k in ("save_dtype", "save_dtypes_refused", "check") if k in written})
    summary["output_dir"] = str(out)
    return summary
