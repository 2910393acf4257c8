"""How qft callbacks change a model exactly once, at the right moment.

Lightning runs ``Callback.setup`` *before* ``LightningModule.configure_model``, and wraps the model
(DDP/FSDP) right after it. A callback that must swap layers (QAT) or plan adapter ranks (PRILoRA)
therefore cannot do it in ``setup`` when the module builds its model lazily. Instead it calls
``when_model_ready(pl_module, fn, phase)``:

- if the module is a qft module that has not built its model yet, ``fn`` is queued and the module
  runs it inside ``configure_model``: phase ``"base"`` after the base model exists and before adapters
  are attached (rank planning), phase ``"final"`` once the model is complete (layer swaps);
- otherwise (any other LightningModule, or a model already built) ``fn(pl_module)`` runs now.

No forward is patched; the hook is the only way in.
"""
from __future__ import annotations

from typing import Callable

PHASES = ("base", "final")


def when_model_ready(pl_module, fn: Callable, phase: str = "final") -> None:
    if phase not in PHASES:
        raise ValueError(f"when_model_ready(phase={phase!r}): allowed phases are {list(PHASES)}.")
    queue = getattr(pl_module, "qft_model_hooks", None)
    if queue is not None and not getattr(pl_module, "model_ready", False):
        queue[phase].append(fn)
    else:
        fn(pl_module)


def run_hooks(pl_module, phase: str) -> None:
    """Called by qft modules from ``configure_model``; each hook runs once."""
    queue = pl_module.qft_model_hooks[phase]
    while queue:
        queue.pop(0)(pl_module)
