"""How qft callbacks change a model exactly once, at the right moment, and how a checkpoint redoes it.

Lightning runs ``Callback.setup`` *before* ``LightningModule.configure_model``, and wraps the model
(DDP/FSDP) right after it. A callback that must swap layers (QAT) or plan adapter ranks (PRILoRA)
therefore cannot do it in ``setup`` when the module builds its model lazily. Instead it calls
``when_model_ready(pl_module, fn, phase)``:

- if the module is a qft module that has not built its model yet, ``fn`` is queued and the module
  runs it inside ``configure_model``, by phase:
  ``"base"``: the base model exists, no adapters yet (PRILoRA plans ranks);
  ``"final"``: adapters attached; structural changes go here (QAT swaps layers);
  ``"observe"``: every structural change is done; hooks that watch layers (PRILoRA's input
  statistics) or check the finished model (the export's grid and calibration checks) go here, so
  they see the layers that will actually run, whatever order the callbacks were given in;
- otherwise (any other LightningModule, or a model already built) ``fn(pl_module)`` runs now.

A structural change also calls ``record_change(pl_module, rebuild, config)``. The module writes the
records into its checkpoints, and ``replay_changes`` redoes them in a fresh module before the weights
load, so a checkpoint restores without the callbacks that shaped it (and ``qft export --ckpt`` rebuilds
exactly the trained model). ``rebuild`` names a function inside the ``qft`` package, called as
``fn(pl_module, config)``; nothing outside ``qft`` is ever imported from a checkpoint.

No forward is patched; the hook is the only way in.
"""
from __future__ import annotations

import importlib
from typing import Callable

PHASES = ("base", "final", "observe")


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


def record_change(pl_module, rebuild: str, config: dict) -> None:
    """Note that ``rebuild(pl_module, config)`` changed the model's structure (once per distinct change)."""
    if not rebuild.startswith("qft."):
        raise ValueError(f"record_change(rebuild={rebuild!r}): rebuild functions live in the qft package.")
    changes = getattr(pl_module, "qft_changes", None)
    if changes is not None and [rebuild, config] not in changes:
        changes.append([rebuild, config])


def replay_changes(pl_module, changes) -> None:
    """Redo recorded structural changes (from a checkpoint) on ``pl_module``, in their order."""
    for rebuild, config in changes or []:
        mod, _, name = str(rebuild).rpartition(".")
        if not mod.startswith("qft."):
            raise ValueError(f"checkpoint asks to rebuild the model with {rebuild!r}, which is not a qft function; "
                             "refusing to import it.")
        getattr(importlib.import_module(mod), name)(pl_module, config)
        record_change(pl_module, rebuild, config)
