"""The floating-point dtype an exported model is written and loaded in: one it runs correctly in.

A quantized checkpoint keeps some tensors in floating point (embeddings, norms, the head, scales), and
the loaders compute in that dtype. float16 is GPTQ's convention and the most precise 16-bit type, but
its range ends at 65,504, and some families pass it: Gemma's residual stream reaches about 1e5, where
every logit of a float16 model becomes nan. The rule, for ``save_dtype="auto"`` and the loaders:

1. a model released in bfloat16 (its config's ``torch_dtype``), or calibrated in a 16-bit dtype, is
   written in that dtype, where it is available (else float32);
2. otherwise float16 is tried first, and kept only if one batch through the written checkpoint, loaded
   as a user loads it, gives finite logits close to the model's (``qft.export.verify``); else bfloat16,
   or float32 where bf16 is unavailable;
3. an explicit ``save_dtype`` is that dtype or a refusal: float16 that overflows is refused with the
   reason, never written.

The loaders (``load_quantized``, ``load_w8a8``, a pruned checkpoint) follow the dtype the checkpoint
declares; a float16 checkpoint that gives non-finite logits on a probe batch (written by an older qft,
or another tool) is run in bfloat16 instead, with a warning.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items() if v is not None}


def check_dtype_name(value, arg: str = "save_dtype", where: str = "export") -> str:
    if value not in DTYPES:
        raise ValueError(f"{where}({arg}={value!r}) is unknown; allowed: {list(DTYPES)} ('auto': a dtype the model "
                         "runs correctly in, qft.export.dtype).")
    return value


def bf16_available(device=None) -> bool:
    """bf16 is computed correctly everywhere but on CUDA devices without it (before Ampere)."""
    device = torch.device(device or "cpu")
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def declared_dtype(config) -> torch.dtype | None:
    """The dtype a model was released in: its ``config.json``'s ``torch_dtype``/``dtype``, read from where it
    was loaded (loading in another dtype overwrites the in-memory config's), else the config's own."""
    source = getattr(config, "_name_or_path", "") or ""
    found = None
    if source and (Path(source) / "config.json").is_file():
        raw = json.loads((Path(source) / "config.json").read_text())
        found = raw.get("torch_dtype") or raw.get("dtype")
    if found is None:
        found = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(found, str):
        found = DTYPES.get(found.replace("torch.", ""))
    return found if isinstance(found, torch.dtype) else None


def save_candidates(save_dtype: str, config=None, device=None, compute: torch.dtype | None = None) -> list[torch.dtype]:
    """The dtypes to try in order (module docstring); the export keeps the first that passes its check.
    ``compute``: the dtype the export calibrated in (a 16-bit one is tried first)."""
    check_dtype_name(save_dtype)
    if DTYPES[save_dtype] is not None:
        return [DTYPES[save_dtype]]
    bf16 = [torch.bfloat16] if bf16_available(device) else []
    if config is not None and declared_dtype(config) == torch.bfloat16:
        return bf16 or [torch.float32]
    order = [torch.float16, *bf16, torch.float32]
    if compute in (torch.float16, torch.bfloat16) and compute in order:
        order = [compute] + [d for d in order if d != compute]
    return order


def checkpoint_dtype(path, state_dict: dict | None = None) -> torch.dtype:
    """The dtype a checkpoint declares (``config.json``'s ``dtype``), else that of its first float tensor."""
    raw = json.loads((Path(path) / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES and DTYPES[name] is not None:
        return DTYPES[name]
    floats = [v.dtype for k, v in (state_dict or {}).items() if v.is_floating_point() and not k.endswith(".scales")]
    return floats[0] if floats else torch.float16


@torch.inference_mode()
def runs_finite(model, tokens: torch.Tensor) -> bool:
    device = next(model.parameters()).device
    return bool(torch.isfinite(model(input_ids=tokens.to(device), use_cache=False).logits).all())


def probe_tokens(path, vocab_size: int) -> torch.Tensor:
    """A short batch to try a loaded model on: the check text through the checkpoint's tokenizer, or ids."""
    from .verify import CHECK_TEXT

    if (Path(path) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(path))(CHECK_TEXT, return_tensors="pt").input_ids[:, :64]
        if ids.shape[-1] >= 16:
            return ids
    return (torch.arange(1, 65) % vocab_size)[None]


def loadable_dtype(path, model, dtype: torch.dtype, requested: bool, fallback) -> torch.nn.Module:
    """``model`` (built in ``dtype``) if it runs; a float16 model the user did not ask for by name that gives
    non-finite logits on ``probe_tokens`` is rebuilt by ``fallback(dtype)`` in bf16 (or fp32), with a warning."""
    if dtype != torch.float16 or requested:
        return model
    if runs_finite(model, probe_tokens(path, model.config.vocab_size)):
        return model
    other = torch.bfloat16 if bf16_available(next(model.parameters()).device) else torch.float32
    warnings.warn(f"{path}: the checkpoint declares float16, but its logits are not finite in float16 (activations "
                  f"beyond 65,504); running it in {NAMES[other]}. Pass dtype= to choose.", stacklevel=3)
    return fallback(other)
