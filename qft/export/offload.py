"""Where the calibration activations of the block-by-block export live: ``calibration_offload``.

GPTQ's block pass keeps, for every calibration batch, the block's inputs, and within a block the outputs
and layer inputs it replays (``qft.export.sequential``). For 128 x 512 tokens of a 576-wide model these
are a few hundred MB; for a 4096-wide model and a larger set they outgrow an accelerator, and on a small
host they are most of the export's peak once the weights stream from disk (``--layerwise``). So each of
those per-batch lists is a ``Stash`` that keeps its entries:

- ``"none"``: as produced, on the compute device (the fastest; the default);
- ``"cpu"``: in host memory, each entry moved to the compute device when it is used (an accelerator then
  holds one block and one batch of activations);
- ``"disk"``: one file per entry in a private temporary directory, read back when it is used and deleted
  when the list is dropped (host memory then holds about one batch too).

The results are the same in every mode (test): only where the tensors wait changes.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

OFFLOADS = ("none", "cpu", "disk")


def check_offload(value: str, where: str = "calibration_offload", backend: str = "qft") -> str:
    """``value`` if it is an offload mode that ``backend`` can honour, else a ValueError naming ``where``."""
    if value not in OFFLOADS:
        raise ValueError(f"{where}: {value!r} is not one of {list(OFFLOADS)}; 'cpu' keeps the cached calibration "
                         f"activations in host memory when the export runs on an accelerator, 'disk' keeps them "
                         f"in temporary files.")
    if value != "none" and backend != "qft":
        raise ValueError(f"{where}: {value!r} applies to qft's own GPTQ, not to backend {backend!r}; use the qft "
                         f"backend or leave the offload at 'none'.")
    return value


def _move(item, device):
    if torch.is_tensor(item):
        return item.to(device)
    if isinstance(item, tuple):
        return tuple(_move(x, device) for x in item)
    return item


class Offload:
    """One export's offload policy: makes the ``Stash`` lists and owns their temporary directory, which is
    removed when the ``Offload`` is dropped (or at interpreter exit; a SIGKILL leaves it in the system's
    temporary directory, named ``qft-calibration-*``)."""

    def __init__(self, mode: str = "none", device=None, directory=None):
        self.mode = check_offload(mode)
        self.device = torch.device(device or "cpu")
        self._dir = None
        self._parent = directory
        self._ids = itertools.count()

    def stash(self) -> "Stash":
        if self.mode == "disk" and self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qft-calibration-", dir=self._parent))
            # the directory goes when the Offload does (each list removes its own files when dropped)
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        return Stash(self, next(self._ids))

    def inputs(self) -> "BlockInputs":
        return BlockInputs(self.stash())


class Stash:
    """A list of per-batch activations (a tensor, or a tuple of tensors and ``None``) kept where the
    ``Offload`` says, and handed back on the compute device."""

    def __init__(self, offload: Offload, ident: int):
        self.offload = offload
        self._items: list = []
        if offload.mode == "disk":
            self._dir = offload._dir / f"{ident}"
            self._dir.mkdir()
            weakref.finalize(self, shutil.rmtree, self._dir, True)

    def append(self, item) -> None:
        mode = self.offload.mode
        if mode == "none":
            self._items.append(item)
        elif mode == "cpu":
            self._items.append(_move(item, "cpu"))
        else:
            path = self._dir / f"{len(self._items)}.pt"
            torch.save(_move(item, "cpu"), path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        item = self._items[i]
        if self.offload.mode == "none":
            return item
        if self.offload.mode == "disk":
            item = torch.load(item, weights_only=True)
        return _move(item, self.offload.device)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class BlockInputs:
    """The calibration set's inputs to one decoder block, ``(hidden, kwargs)`` per batch: the hidden states
    in a ``Stash``, the (small, shared) keyword arguments such as rotary embeddings and masks in memory."""

    def __init__(self, hidden: Stash):
        self.hidden, self.kwargs = hidden, []

    def append(self, hidden: torch.Tensor, kwargs: dict) -> None:
        self.hidden.append(hidden)
        self.kwargs.append(kwargs)

    def extend(self, other: "BlockInputs") -> "BlockInputs":
        for hidden, kwargs in other:
            self.append(hidden, kwargs)
        return self

    def __len__(self) -> int:
        return len(self.kwargs)

    def __getitem__(self, i: int):
        return self.hidden[i], self.kwargs[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))
