"""Library noise that a qft user cannot act on, silenced at qft's entry points (``--verbose`` keeps it).

Each entry says where the line comes from and why it is noise here; nothing else is touched, so any
warning a user should act on still shows. ``make demo`` printed about a dozen such lines before its
table; a progress line every 10 steps (``qft.progress``) is what a person needs to see instead.
"""
from __future__ import annotations

import logging
import warnings

# (message regex, why it is noise for a qft user)
WARNINGS = [
    (r".*module\(s\) in eval mode at the start of training",
     "Lightning: qft freezes the base model's modules in eval mode on purpose (no dropout in frozen layers)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning calling a deprecated torch API"),
    (r"`is_gradient_checkpointing` is deprecated", "transformers calling its own deprecated API (peft's call path)"),
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed",
     "Lightning: the CSV logger it falls back to is what qft expects"),
    (r"LightningCLI's args parameter is intended to run from within Python",
     "Lightning: `qft fit` hands LightningCLI its arguments without --verbose, as it should"),
    (r"'set_vital' is deprecated", "torchdata's StatefulDataLoader calling a deprecated torch API"),
]
LOG_LINES = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes: the optional `kernels` package; its pure-torch CPU path is what runs, and is measured"),
]
# Lightning's info lines (accelerator summary, cloud-product tips, "fit stopped: max_steps reached")
QUIET_LOGGERS = ["pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"]


class _DropMessages(logging.Filter):
    def __init__(self, starts: list[str]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(msg.startswith(s) for s in self.starts)


def quiet(verbose: bool = False) -> None:
    """Silence the lines above for the rest of the process (no-op with ``verbose``)."""
    if verbose:
        return
    for pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in {n for n, _, _ in LOG_LINES}:  # the emitting module's own logger (getLogger(__name__))
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages([s for n, s, _ in LOG_LINES if n == name]))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars of the cached built-in model
    except Exception:
        pass
