"""Turning records into training tensors: packing plain text, masking chat prompts."""
from __future__ import annotations

import torch

IGNORE = -100


def pack(ids: list[int], seq_len: int) -> list[list[int]]:
    """Cut one token stream into full ``seq_len`` blocks (the ragged tail is dropped)."""
    n = len(ids) // seq_len
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def _chat_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens of the conversation up to (and including) the assistant header of the last turn."""
    return _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)


def chat_example(tokenizer, messages: list[dict]) -> dict:
    """``input_ids``/``labels`` for a chat whose last message is the response; loss on the response only."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chat example must end with an assistant message (the response to learn).")
    prompt = prompt_ids(tokenizer, messages)
    full = _chat_ids(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently inside the full conversation; "
                         "cannot mask the prompt tokens reliably.")
    # Templates often end with a newline after the end-of-turn token: not worth learning.
    while len(full) > len(prompt) + 1 and not tokenizer.decode(full[-1:]).strip():
        full = full[:-1]
    return {"input_ids": full, "labels": [IGNORE] * len(prompt) + full[len(prompt):]}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of ``input_ids``/``labels`` records into a batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
