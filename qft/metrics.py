"""Exact-match accuracy by greedy generation (the synthetic task's metric)."""
from __future__ import annotations

import torch
import torchmetrics

from .data.tokenize import prompt_ids


def _norm(s: str) -> str:
    return " ".join(s.strip().split())


class ExactMatch(torchmetrics.Metric):
    """Share of generated answers equal to the reference after whitespace normalisation.

    Counts are summed across processes by torchmetrics, so the figure is global under DDP.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"ExactMatch.update: {len(preds)} predictions for {len(targets)} targets.")
        self.correct += sum(_norm(p) == _norm(t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


@torch.no_grad()
def greedy_answers(model, tokenizer, chats: list[list[dict]], max_new_tokens: int = 8, batch_size: int = 32,
                   dtype: torch.dtype = torch.float32) -> list[str]:
    """Greedy completions of the last assistant turn of each chat (its content is not shown to the model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    answers = []
    try:
        for i in range(0, len(chats), batch_size):
            prompts = [prompt_ids(tokenizer, c) for c in chats[i:i + batch_size]]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(prompts):  # left padding, so every prompt ends where generation starts
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def generation_accuracy(model, tokenizer, chats: list[list[dict]], **kwargs) -> float:
    """Exact-match accuracy of greedy answers against each chat's final assistant message."""
    metric = ExactMatch()
    metric.update(greedy_answers(model, tokenizer, chats, **kwargs), [c[-1]["content"] for c in chats])
    return float(metric.compute())
