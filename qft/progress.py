"""``ProgressLines``: one plain line every few optimizer steps, for logs and terminals alike.

Why not Lightning's progress bar: a bar redrawn in place turns into thousands of carriage returns in a
CI log or a ``tee``'d file, and says nothing once scrolled away. A line per ``every`` steps, with the
loss, the step time, tokens/s and the time left, keeps a long CPU fit from looking hung and reads well anywhere.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl

from .module import batch_tokens


class ProgressLines(pl.Callback):
    """Print ``step k/N  loss  s/step  tokens/s  eta`` every ``every`` optimizer steps (rank zero only).

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
        self._t0, self._start_step, self._tokens = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, dict) and "input_ids" in batch:
            self._tokens += batch_tokens(batch)
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        if not trainer.is_global_zero or step == self._last or not (step % self.every == 0 or step == total):
            return
        self._last = step
        done, elapsed = max(step - self._start_step, 1), time.perf_counter() - self._t0
        per = elapsed / done
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}" + (f"/{total}" if total else ""),
                 f"loss {float(loss):.3f}" if loss is not None else None, f"{per:.2f} s/step",
                 f"{self._tokens / max(elapsed, 1e-9):.0f} tokens/s" if self._tokens else None,
                 f"eta {per * (total - step):.0f} s" if total else None]
        print(self.prefix + "  ".join(p for p in parts if p), flush=True)
