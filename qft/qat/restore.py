"""Rebuilding fake-quant layers in a fresh module from a QAT checkpoint.

A fresh LightningModule has plain ``nn.Linear`` layers, so a QAT checkpoint's scale/zero/observer
entries would find nowhere to land (Lightning #6457). The checkpoint carries the callback's config,
which is enough to redo the swap before the weights are loaded.
"""
from __future__ import annotations

import os

from .config import QATConfig
from .prepare import fake_quant_modules, prepare


def _load(checkpoint):
    if isinstance(checkpoint, (str, os.PathLike)):
        from qft.safe_load import load_checkpoint

        return load_checkpoint(checkpoint)  # weights-only: a QAT state is plain containers and tensors
    return checkpoint


def checkpoint_config(checkpoint) -> QATConfig:
    """The ``QATConfig`` a checkpoint was trained with (raises if it holds no QATCallback state)."""
    ckpt = _load(checkpoint)
    for key, state in ckpt.get("callbacks", {}).items():
        if str(key).startswith("QATCallback") and "config" in state:
            return QATConfig(**state["config"])
    raise ValueError("qft.qat: the checkpoint holds no QATCallback state (callbacks: "
                     f"{list(ckpt.get('callbacks', {}))}); was it saved by a Trainer with QATCallback?")


def rebuild(pl_module, config: dict) -> list:
    """``qft.hooks`` replay of a QAT swap recorded in a checkpoint: ``prepare`` with the recorded config."""
    return prepare(pl_module, QATConfig(**config))


def prepare_from_checkpoint(pl_module, checkpoint) -> list:
    """Swap ``pl_module``'s layers as the checkpoint's QAT run did, without loading weights.

    Meant for ``LightningModule.on_load_checkpoint`` (Lightning then loads the state dict itself).
    """
    return prepare(pl_module, checkpoint_config(checkpoint))


def restore(pl_module, checkpoint, strict: bool = True):
    """Load a QAT checkpoint (path or dict) into a fresh ``pl_module``: build, swap, load the weights.

    Returns the ``QATConfig`` used. With ``strict`` every fake-quant buffer/parameter must be in the
    checkpoint (other missing keys, e.g. frozen base weights qft never saves, are allowed).
    """
    ckpt = _load(checkpoint)
    config = checkpoint_config(ckpt)
    if hasattr(pl_module, "configure_model") and not getattr(pl_module, "model_ready", False):
        pl_module.configure_model()
    prepare(pl_module, config)
    result = pl_module.load_state_dict(ckpt["state_dict"], strict=False)
    if strict:
        qat_keys = {f"{n}.{k}" for n, m in fake_quant_modules(pl_module)
                    for k, _ in list(m.named_buffers(recurse=True)) + [(p, None) for p, _ in m.named_parameters()]
                    if k.startswith(("qat_", "weight_scale", "weight_zero", "input_quant."))}
        missing = sorted(qat_keys & set(result.missing_keys))
        if missing:
            raise KeyError(f"qft.qat.restore: the checkpoint lacks fake-quant state {missing[:5]} "
                           f"({len(missing)} keys); it was saved with a different model or QAT config.")
    return config
