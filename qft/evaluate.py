"""Held-out figures: perplexity on a text file, accuracy on the synthetic task."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .data.synthetic import addition_splits
from .metrics import generation_accuracy


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 1024, max_windows: int | None = None,
               batch_size: int = 1) -> float:
    """Perplexity over non-overlapping ``seq_len`` windows of a 1-D token tensor (the GPTQ paper's protocol)."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"perplexity: {ids.numel()} tokens is less than one window of seq_len={seq_len}.")
    windows = ids[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def text_perplexity(model, tokenizer, path: str | Path, seq_len: int = 1024, max_windows: int | None = 16,
                    start_fraction: float = 0.0) -> float:
    """Perplexity on a text file, starting ``start_fraction`` of the way in (0.9 = Tiny Shakespeare's held-out part)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text_perplexity(path={str(path)!r}): the file is empty.")
    text = text[int(len(text) * start_fraction):]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return perplexity(model, ids, seq_len=seq_len, max_windows=max_windows)


def task_accuracy(model, tokenizer, num_val: int = 200, seed: int = 0, **kwargs) -> float:
    """Greedy exact match on the synthetic task's held-out problems (same split as QFTDataModule)."""
    _, val = addition_splits(1, num_val, seed)
    return generation_accuracy(model, tokenizer, [v["messages"] for v in val], **kwargs)
