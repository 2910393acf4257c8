"""``ProgressLines``: one plain line every few optimizer steps, for logs and terminals alike.

Why not Lightning's progress bar: a bar redrawn in place turns into thousands of carriage returns in a
CI log or a ``tee``'d file, and says nothing once scrolled away. A line per ``every`` steps, with the
loss, the step time and the time left, keeps a long CPU fit from looking hung and reads well anywhere.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl


class ProgressLines(pl.Callback):
    """Print ``step k/N  loss  s/step  eta`` every ``every`` optimizer steps (rank zero only).

    Lifecycle: ``on_train_start`` starts the clock; ``on_train_batch_end`` prints when the global step
    is a multiple of ``every`` or the last one. Holds no state worth checkpointing.
    """

    def __init__(self, every: int = 10, prefix: str = "    "):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ProgressLines(every={every!r}): expected an integer >= 1 (steps between lines).")
        self.every, self.prefix = every, prefix
        self._t0 = None
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._t0, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        if not trainer.is_global_zero or step == self._last or not (step % self.every == 0 or step == total):
            return
        self._last = step
        done = max(step - self._start_step, 1)
        per = (time.perf_counter() - self._t0) / done
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}" + (f"/{total}" if total else ""),
                 f"loss {float(loss):.3f}" if loss is not None else None, f"{per:.2f} s/step",
                 f"eta {per * (total - step):.0f} s" if total else None]
        print(self.prefix + "  ".join(p for p in parts if p), flush=True)
