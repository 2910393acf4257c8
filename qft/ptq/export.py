"""``export_w8a8``: from a trained model to a W8A8 compressed-tensors checkpoint in one call.

The same road as the GPTQ export (``qft.export.pipeline.export``): the adapters are merged into the
base they trained on (``qft.export.merge``), then ``quantize_w8a8`` and ``save_w8a8`` run. Arguments
are checked, and the output directory too, before the model is touched.
"""
from __future__ import annotations

import time

import torch

from qft import layers
from qft.export.checkpoint import check_output_dir
from qft.export.merge import DEFAULT_MERGE_INTO, check_merge_into, merge_adapters
from qft.export.pipeline import DTYPES, resolve_dtype

from .config import W8A8Config
from .model import quantize_w8a8


def export_w8a8(trained, tokenizer, tokens: torch.Tensor | None, output_dir, cfg: W8A8Config,
                base_name: str | None = None, merge_into: str = DEFAULT_MERGE_INTO, masks=None, device=None,
                dtype: str = "auto", save_dtype: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Merge ``trained`` (a plain, LoRA or NF4+LoRA model), quantize it to W8A8 and write ``output_dir``.

    ``dtype``: the precision of the weight solve and the calibration passes (``auto``: bf16 where
    supported); ``save_dtype``: of the tensors left in floating point (``auto``: fp16 for fp32, else the
    compute dtype). Returns the summary, also written as ``qft_export.json``.
    """
    from .checkpoint import save_w8a8

    if not isinstance(cfg, W8A8Config):
        raise TypeError(f"export_w8a8(cfg={cfg!r}): expected a qft.ptq.W8A8Config.")
    for arg, value in (("dtype", dtype), ("save_dtype", save_dtype)):
        if value not in DTYPES:
            raise ValueError(f"export_w8a8({arg}={value!r}) is unknown; allowed: {list(DTYPES)}.")
    merge_into = check_merge_into(merge_into)
    learned = layers.grids(trained)
    if learned:
        raise ValueError(f"export_w8a8: {len(learned)} layers carry a QAT grid (e.g. {next(iter(learned))}); the "
                         "W8A8 export solves its own int8 grid from the merged weights. Export them with GPTQ "
                         "(qft export), or train without QAT.")
    check_output_dir(output_dir, overwrite)
    device = torch.device(device or "cpu")
    t0 = time.perf_counter()
    was_training = trained.training
    trained.eval()
    model = merge_adapters(trained, base_name, merge_into=merge_into, masks=masks)
    trained.train(was_training)
    compute = resolve_dtype(dtype, device)
    summary = quantize_w8a8(model, cfg, tokens, device=device, progress=progress, compute_dtype=compute)
    rows = summary.pop("rows")
    summary.update(merge_into=merge_into, dtype=str(compute).replace("torch.", ""),
                   calibration=None if tokens is None else list(tokens.shape), seconds=time.perf_counter() - t0)
    save = DTYPES[save_dtype] or (torch.float16 if compute == torch.float32 else compute)
    out = save_w8a8(model, output_dir, cfg, tokenizer=tokenizer, overwrite=overwrite, dtype=save,
                    extra_files={"qft_export.json": {**summary, "layers_report": rows}})
    summary["output_dir"] = str(out)
    return summary
