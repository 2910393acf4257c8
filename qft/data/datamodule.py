"""``QFTDataModule``: local text, instruction data, or the built-in synthetic task.

Everything is read through the ``datasets`` library from local files (this machine cannot reach a
hub). Splits are deterministic: text is split by characters (first ``1 - val_fraction`` for
training, the rest held out, the Tiny Shakespeare convention), instruction records by a seeded
shuffle, and the synthetic task by disjoint seeds.
"""
from __future__ import annotations

import os
import random
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from .. import models
from .synthetic import addition_splits
from .tokenize import chat_example, collate, pack

TASKS = ("synthetic", "text", "instruct")


def _load_rows(path: str, kind: str) -> list[dict]:
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(f"QFTDataModule(path={path!r}): no such file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"QFTDataModule(path={path!r}): the file is empty.")
    with open(path, "rb") as f:
        if b"\x00" in f.read(1 << 20):  # valid UTF-8 can hold NULs, so `datasets` would read a binary file
            raise ValueError(f"QFTDataModule(path={path!r}): this looks like a binary file (it holds NUL bytes), "
                             f"not {'text' if kind == 'text' else 'JSON/JSONL'}; point path at a UTF-8 text file.")
    try:
        if kind == "text":
            ds = load_dataset("text", data_files=path, sample_by="document", split="train")
        else:
            ds = load_dataset("json", data_files=path, split="train")
    except Exception:
        _locate_error(path, kind)  # `datasets` names neither the file nor the line: find them
        raise
    rows = ds.to_list()
    if not rows:
        raise ValueError(f"QFTDataModule(path={path!r}): the file holds no records.")
    return rows


def _locate_error(path: str, kind: str) -> None:
    """After ``datasets`` failed on ``path``: raise a qft message naming the line that is not UTF-8 or not
    valid JSON/JSONL (returns if it finds none, and the library's error stands)."""
    import json

    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"QFTDataModule(path={path!r}): line {line} is not UTF-8 (byte {e.start}); save the file "
                         "as UTF-8.") from None
    if kind == "text":
        return
    if text.lstrip().startswith("["):  # one JSON array
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"QFTDataModule(path={path!r}): invalid JSON at line {e.lineno}, column {e.colno}: "
                             f"{e.msg}.") from None
        return
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: one record per line
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"QFTDataModule(path={path!r}): line {number} is not valid JSON ({e.msg}); JSONL "
                                 f"needs one JSON object per line: {line[:80]!r}") from None


def instruct_messages(row: dict, path: str) -> list[dict]:
    """A chat ``messages`` list from either ``messages`` or ``instruction``/``input``/``output`` columns."""
    if row.get("messages"):
        return row["messages"]
    for col in ("instruction", "output"):
        if col not in row:
            raise KeyError(f"QFTDataModule(path={path!r}): missing column {col!r}; instruction data needs "
                           f"'instruction' and 'output' (and optional 'input'), or chat 'messages'. "
                           f"Found columns: {sorted(row)}.")
    if row["instruction"] is None or row["output"] is None:
        raise ValueError(f"QFTDataModule(path={path!r}): a record has neither 'messages' nor "
                         f"'instruction'/'output': {row}.")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


class EpochShuffle(Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the very batches an
    uninterrupted run sees (mid-epoch, the StatefulDataLoader skips the ones already served).
    Lightning calls ``set_epoch`` each epoch (under DDP it swaps in a DistributedSampler, which
    follows the same rule)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class QFTDataModule(pl.LightningDataModule):
    """Data for causal-LM fine-tuning.

    Args:
        task: ``synthetic`` (3-digit addition chats, loss on answers), ``text`` (plain text packed into
            ``seq_len`` blocks) or ``instruct`` (JSON/JSONL with instruction/input/output or ``messages``,
            rendered with the tokenizer's chat template, loss on the response only).
        path: the local file for ``text`` and ``instruct``.
        tokenizer: model name whose tokenizer to use; ``None`` takes the attached LightningModule's
            ``hparams.model`` (so ``--model.init_args.model=X`` alone switches both).
        seq_len: block length for ``text``; the truncation length for chat examples.
        batch_size, num_workers: DataLoader settings.
        val_fraction: held-out share for ``text`` (by characters) and ``instruct`` (by records).
        num_train, num_val: synthetic problems per split.
        seed: split and shuffle seed.
    """

    def __init__(self, task: str = "synthetic", path: str | None = None, tokenizer: str | None = None,
                 seq_len: int = 512, batch_size: int = 8, num_workers: int = 0, val_fraction: float = 0.1,
                 num_train: int = 2000, num_val: int = 200, seed: int = 0):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"QFTDataModule(task={task!r}) is unknown; allowed: {list(TASKS)}.")
        if task != "synthetic" and not path:
            raise ValueError(f"QFTDataModule(task={task!r}) needs path= to a local file.")
        if task != "synthetic" and not os.path.isfile(path):
            raise FileNotFoundError(f"QFTDataModule(path={path!r}): no such file.")
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("num_train", num_train),
                        ("num_val", num_val)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"QFTDataModule({name}={v!r}): must be an integer >= 1.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"QFTDataModule(val_fraction={val_fraction!r}): must be in (0, 1).")
        self.save_hyperparameters()
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.val_problems: list[dict] = []  # synthetic: held-out chats for generation accuracy
        self._tok = None

    @property
    def model_name(self) -> str:
        if self.hparams.tokenizer:
            return self.hparams.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(getattr(module, "hparams", None), "model", None)
        return name or "smollm2-135m"

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = models.load_tokenizer(self.model_name)
        return self._tok

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        hp = self.hparams
        limit = models.max_length(self.model_name)
        if hp.seq_len > limit:
            raise ValueError(f"QFTDataModule(seq_len={hp.seq_len}) is longer than model {self.model_name!r} "
                             f"supports (max_position_embeddings={limit}).")
        tok = self.tokenizer
        if hp.task == "text":
            text = "\n".join(r["text"] for r in _load_rows(hp.path, "text"))
            cut = int(len(text) * (1 - hp.val_fraction))
            blocks = {s: pack(tok(t)["input_ids"], hp.seq_len) for s, t in (("train", text[:cut]), ("val", text[cut:]))}
            for split, b in blocks.items():
                if not b:
                    raise ValueError(f"QFTDataModule(path={hp.path!r}): the {split} split has fewer than "
                                     f"seq_len={hp.seq_len} tokens; lower seq_len or val_fraction.")
            self.train_set = [{"input_ids": b} for b in blocks["train"]]
            self.val_set = [{"input_ids": b} for b in blocks["val"]]
            return
        if hp.task == "synthetic":
            train, val = addition_splits(hp.num_train, hp.num_val, hp.seed)
        else:
            rows = [{"messages": instruct_messages(r, hp.path)} for r in _load_rows(hp.path, "json")]
            random.Random(hp.seed).shuffle(rows)
            n_val = max(1, int(round(len(rows) * hp.val_fraction)))
            if len(rows) < 2:
                raise ValueError(f"QFTDataModule(path={hp.path!r}): need at least 2 records to split, got {len(rows)}.")
            train, val = rows[n_val:], rows[:n_val]
        self.val_problems = val
        self.train_set = [self._truncate(chat_example(tok, r["messages"])) for r in train]
        self.val_set = [self._truncate(chat_example(tok, r["messages"])) for r in val]

    def _truncate(self, ex: dict) -> dict:
        n = self.hparams.seq_len
        return {k: v[:n] for k, v in ex.items()}

    def _loader(self, data, shuffle):
        # The training loader is torchdata's StatefulDataLoader: Lightning saves its position in every
        # checkpoint and restores it, so a run killed mid-epoch resumes on the very next batch (a plain
        # DataLoader would restart the epoch). The sampler needs no state of its own: its order depends
        # only on (seed, epoch), and the loader fast-forwards it by the batches already served.
        from torchdata.stateful_dataloader import StatefulDataLoader

        cls = StatefulDataLoader if shuffle else DataLoader
        sampler = EpochShuffle(len(data), self.hparams.seed) if shuffle else None
        return cls(data, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers,
                   collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.val_set, shuffle=False)
