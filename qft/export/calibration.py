"""Calibration data for GPTQ: ``N`` windows of ``seq_len`` tokens, from wherever the user has text.

GPTQ only needs the layer inputs of representative text, so every source is reduced to one token stream
that is cut into ``N`` non-overlapping windows spread evenly over it. Sources:

- a ``LightningDataModule`` (its train dataloader, padding dropped via ``attention_mask``);
- a path to a text file;
- a list of strings (joined with the tokenizer's EOS);
- an integer tensor ``[N, T]`` (already tokenised; used as is) or a 1-D token stream.

All problems (no data, too few tokens) are raised here, before any model work starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_N_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048


class CalibrationError(ValueError):
    """The calibration data cannot give the requested ``n_samples x seq_len`` tokens."""


def model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _stream_from_text(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _stream_from_datamodule(dm, needed: int) -> torch.Tensor:
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    if hasattr(dm, "setup"):
        dm.setup("fit")
    chunks, total = [], 0
    for batch in dm.train_dataloader():
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        for row in range(ids.shape[0]):
            r = ids[row] if mask is None else ids[row][mask[row].bool()]
            chunks.append(r.long().cpu())
            total += r.numel()
        if total >= needed:
            break
    if not chunks:
        raise CalibrationError("calibration: the DataModule's train_dataloader() yielded no batches; "
                               "pass a text file or a list of strings instead.")
    return torch.cat(chunks)


def token_stream(source: Any, tokenizer=None, needed: int = 0) -> torch.Tensor:
    """One 1-D token stream from any supported source (2-D tensors are flattened)."""
    if source is None:
        raise CalibrationError(
            "calibration=None: GPTQ needs calibration data. Pass a text file path, a list of strings, "
            "a LightningDataModule, or a token tensor (e.g. calibration='data/train.txt').")
    if isinstance(source, torch.Tensor):
        if source.dtype.is_floating_point or source.numel() == 0:
            raise CalibrationError(f"calibration tensor must be non-empty integer token ids, got dtype={source.dtype}, "
                                   f"shape={tuple(source.shape)}.")
        return source.reshape(-1).long()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"calibration={str(source)!r}: no such file. Pass an existing text file, a list of "
                                   "strings or a DataModule.")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CalibrationError(f"calibration={str(source)!r}: the file is empty.")
        return _stream_from_text(text, _need_tok(tokenizer))
    if isinstance(source, (list, tuple)):
        texts = [t for t in source if isinstance(t, str) and t.strip()]
        if not texts or len(texts) != len(source):
            raise CalibrationError(f"calibration list must hold non-empty strings; got {len(source)} items of which "
                                   f"{len(texts)} are non-empty strings.")
        tok = _need_tok(tokenizer)
        sep = tok.eos_token or "\n\n"
        return _stream_from_text(sep.join(texts), tok)
    if hasattr(source, "train_dataloader"):
        return _stream_from_datamodule(source, needed)
    raise CalibrationError(f"calibration of type {type(source).__name__} is not supported; allowed: a text file "
                           "path, a list of strings, a LightningDataModule, or an integer token tensor.")


def _need_tok(tokenizer):
    if tokenizer is None:
        raise CalibrationError("calibration from text needs a tokenizer; pass tokenizer=...")
    return tokenizer


def calibration_tokens(source: Any, tokenizer=None, n_samples: int = DEFAULT_N_SAMPLES,
                       seq_len: int = DEFAULT_SEQ_LEN, max_length: int | None = None) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids (``seq_len`` capped at ``max_length``, the model's context).

    A ready ``[N, T]`` tensor is returned as is (after the same checks). Otherwise the stream is cut into
    ``n_samples`` windows at evenly spaced offsets; fewer than ``n_samples * seq_len`` tokens is an error.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise CalibrationError(f"n_samples={n_samples!r} must be a positive integer (default {DEFAULT_N_SAMPLES}).")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise CalibrationError(f"seq_len={seq_len!r} must be an integer >= 2 (default {DEFAULT_SEQ_LEN}).")
    if max_length:
        seq_len = min(seq_len, max_length)
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        token_stream(source)  # validates
        if source.shape[1] < 2:
            raise CalibrationError(f"calibration tensor {tuple(source.shape)} has sequences shorter than 2 tokens.")
        return source.long()[:, : max_length or None]
    needed = n_samples * seq_len
    stream = token_stream(source, tokenizer, needed)
    if stream.numel() < needed:
        raise CalibrationError(
            f"calibration: too few tokens: {stream.numel()} available, {n_samples} x {seq_len} = {needed} needed. "
            "Give more text, or lower n_samples / seq_len.")
    stride = (stream.numel() - seq_len) // max(n_samples - 1, 1) if n_samples > 1 else 0
    stride = max(stride, seq_len)
    starts = [k * stride for k in range(n_samples)]
    return torch.stack([stream[s:s + seq_len] for s in starts])


# A quarter of the windows from general text: on the demo's quantization-aware fine-tune, the anchored
# export kept 77% task accuracy and WikiText-2 perplexity 31.7 with 0.25, 68% and 30.1 with 0.5
# (BENCHMARKS.md, export roads): a little general text buys most of the general ability back.
GENERAL_FRACTION = 0.25


def calibration_mix(task: Any, general: Any = None, tokenizer=None, n_samples: int = DEFAULT_N_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, general_fraction: float = GENERAL_FRACTION,
                    max_length: int | None = None) -> torch.Tensor:
    """Calibration windows from the task mixed with general text: ``round(n_samples * general_fraction)``
    windows of ``general``, the rest of ``task``, each source cut into evenly spaced windows.

    Why mix: GPTQ minimises the output error on the calibration inputs only, so a set of task prompts
    alone lets the solve spend the grid on the task and lose the base model's general ability (measured
    on the demo in BENCHMARKS.md). Mixing in general text is common practice. ``general=None`` gives
    the task windows alone; both sources take any form ``calibration_tokens`` accepts (a 2-D tensor is
    read as a stream here, so both parts share ``seq_len``).
    """
    if general is None:
        return calibration_tokens(task, tokenizer, n_samples, seq_len, max_length)
    if isinstance(general_fraction, bool) or not isinstance(general_fraction, (int, float)) \
            or not 0.0 <= general_fraction <= 1.0:
        raise CalibrationError(f"general_fraction={general_fraction!r} must be a number in [0, 1] (0.5: half of the "
                               "windows from general text).")
    n_general = round(n_samples * general_fraction)
    flat = lambda s: s.reshape(-1) if isinstance(s, torch.Tensor) else s  # noqa: E731
    parts = [calibration_tokens(flat(src), tokenizer, n, seq_len, max_length)
             for src, n in ((task, n_samples - n_general), (general, n_general)) if n > 0]
    return torch.cat(parts)


def skip_start(source: Any, start: float) -> Any:
    """``source`` without its first ``start`` fraction: characters of a text file, tokens of a tensor.

    Why: a standard evaluation set used as general calibration text must not overlap its evaluation
    windows; WikiText-2's convention (``../shared/data/README.md``) evaluates on the first 16 x 1024
    tokens and calibrates on the second half (``start=0.5``).
    """
    if start == 0 or source is None:
        return source
    if isinstance(source, torch.Tensor):
        flat = source.reshape(-1)
        return flat[int(flat.numel() * start):]
    if isinstance(source, (str, os.PathLike)):
        text = Path(source).read_text(encoding="utf-8")
        return [text[int(len(text) * start):]]
    raise CalibrationError(f"general_start={start}: applies to a text file or a token tensor, not "
                           f"{type(source).__name__}.")
