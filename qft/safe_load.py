"""Reading qft/Lightning checkpoints without running code from them.

Full unpickling (``torch.load`` without ``weights_only``) rebuilds arbitrary objects, so a checkpoint
downloaded from someone else could run code on ``qft eval`` or ``qft export``. qft's own checkpoints
hold only tensors and plain containers (hyper-parameters, callback states, the record of model
changes), which torch's weights-only unpickler reads. Anything else is refused with a message, unless
the caller opts in explicitly.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or at all."""


def load_checkpoint(path, allow_unsafe: bool = False) -> dict:
    """The checkpoint at ``path`` as a dict, read by torch's weights-only unpickler (on the CPU).

    ``allow_unsafe=True`` falls back to full unpickling for a checkpoint that needs it: only for files
    from a source you trust. A missing, truncated or non-checkpoint file fails with a message naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file (a Lightning .ckpt is expected).")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch's zip format, or a legacy pickle
        raise _unreadable(path, ValueError(f"it starts with {head!r}, not a zip archive or a pickle"))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # torch's refusal says "Weights only load failed"
            raise _unreadable(path, e) from None
        if not allow_unsafe:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"e.g. {found.group(1)}" if found else "objects beyond tensors and plain containers"
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects that only full unpickling can rebuild ({what}). "
                "Full unpickling can run arbitrary code from the file. qft's own checkpoints never need it; if "
                "you trust where this one came from, opt in with allow_unsafe=True (CLI: --allow-unsafe-load)."
            ) from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, a text file, another format: torch raises many kinds
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict'); qft "
                              "reads the .ckpt files a Trainer saves.")
    return ckpt


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} could not be read: it is truncated, corrupt or not a torch "
                           f"checkpoint ({type(e).__name__}: {str(e).strip()[:200]}). Point to a complete .ckpt "
                           "file (ModelCheckpoint's last.ckpt, for example).")
