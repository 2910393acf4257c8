"""``GPTQExportCallback``: merge + GPTQ + HF checkpoint at the end of ``trainer.fit``."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from qft import hooks

from .calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN, calibration_tokens, model_max_length
from .checkpoint import check_output_dir
from .config import GPTQConfig
from .merge import MERGE_INTO
from .pipeline import DTYPES, check_backend, export
from .blocks import find_decoder_blocks

_D = GPTQConfig()  # the callback's defaults are the config's


class GPTQExportCallback(pl.Callback):
    """Export the fine-tuned model as a Hugging Face GPTQ checkpoint when ``fit`` ends.

    Args:
        output_dir: where the checkpoint goes (must not exist unless ``overwrite``).
        bits, group_size, sym, desc_act, static_groups, act_group_aware, true_sequential, damp_percent,
            hessian_dtype, mse, method: the quantization, see :class:`qft.export.GPTQConfig` (defaults are
            its defaults; ``method="rtn"`` for round-to-nearest).
        calibration: a text file, a list of strings, a token tensor, or a DataModule; ``None`` uses the
            trainer's DataModule.
        n_samples, seq_len: calibration windows (``seq_len`` capped at the model's context).
        merge_into: ``"original"`` (reload the full-precision base) or ``"dequantized_nf4"``.
        backend: ``"qft"`` (pure torch) or ``"gptqmodel"`` (needs the ``interop`` extra).
        device: where blocks are quantized (default: the module's device); dtype: forward dtype.
        overwrite: replace an existing ``output_dir``.

    Lifecycle
    ---------
    - ``__init__``: validates every argument (bits, group size, backend availability, output dir).
    - ``setup`` (stage ``fit``): registers a ``"final"`` model hook (``qft.hooks.when_model_ready``) that,
      once the model exists and before any training step, checks it has decoder blocks and builds the
      calibration tokens, so missing data or too few tokens fail before training, on every rank.
    - ``on_fit_end``: rank zero merges the adapters (PRILoRA masks from a ``PRILoRACallback`` in the
      trainer are applied), measures drift, quantizes block by block and writes the checkpoint; the other
      ranks wait on a barrier. ``summary`` and ``checkpoint_path`` hold the result.
    - ``state_dict``/``load_state_dict``: whether the export ran and where, so a resumed run knows.
    """

    def __init__(self, output_dir, bits: int = _D.bits, group_size: int = _D.group_size, sym: bool = _D.sym,
                 desc_act: bool = _D.desc_act, static_groups: bool = _D.static_groups,
                 act_group_aware: bool | None = None, true_sequential: bool = _D.true_sequential,
                 damp_percent: float = _D.damp_percent, hessian_dtype: str = _D.hessian_dtype, mse: bool = _D.mse,
                 method: str = _D.method, calibration=None, n_samples: int = DEFAULT_N_SAMPLES,
                 seq_len: int = DEFAULT_SEQ_LEN, merge_into: str = "original", backend: str = "qft", device=None,
                 dtype: str = "auto", overwrite: bool = False, measure_drift: bool = True, progress: bool = True):
        super().__init__()
        self.config = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                                 static_groups=static_groups, act_group_aware=act_group_aware,
                                 true_sequential=true_sequential, damp_percent=damp_percent,
                                 hessian_dtype=hessian_dtype, mse=mse, method=method)
        if merge_into not in MERGE_INTO:
            raise ValueError(f"GPTQExportCallback(merge_into={merge_into!r}) is unknown; allowed: {list(MERGE_INTO)}.")
        if dtype not in DTYPES:
            raise ValueError(f"GPTQExportCallback(dtype={dtype!r}) is unknown; allowed: {list(DTYPES)}.")
        check_backend(backend)
        if not isinstance(n_samples, int) or n_samples < 1 or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"GPTQExportCallback(n_samples={n_samples!r}, seq_len={seq_len!r}): need n_samples >= 1 "
                             "and seq_len >= 2 (defaults 128 x 2048).")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        check_output_dir(self.output_dir, overwrite)
        self.calibration, self.n_samples, self.seq_len = calibration, n_samples, seq_len
        self.merge_into, self.backend, self.device, self.dtype = merge_into, backend, device, dtype
        self.measure_drift, self.progress = measure_drift, progress
        self.tokens: torch.Tensor | None = None
        self.summary: dict | None = None
        self.checkpoint_path: str | None = None

    # ------------------------------------------------------------------ checks before training
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self._trainer = trainer
        hooks.when_model_ready(pl_module, self._prepare, phase="final")

    def _prepare(self, pl_module):
        model = pl_module.model if hasattr(pl_module, "model") else pl_module
        find_decoder_blocks(model)
        source = self.calibration
        if source is None:
            source = getattr(getattr(self, "_trainer", None), "datamodule", None)
        tokenizer = getattr(pl_module, "tokenizer", None)
        self.tokens = calibration_tokens(source, tokenizer, self.n_samples, self.seq_len,
                                         max_length=model_max_length(model))

    # ------------------------------------------------------------------ the export
    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            if self.tokens is None:
                self._prepare(pl_module)
            masks = None
            for cb in trainer.callbacks:
                if type(cb).__name__ == "PRILoRACallback" and getattr(cb, "masks", None):
                    masks = cb.masks
            base_name = getattr(pl_module, "hparams", {}).get("model", getattr(pl_module, "model_name", None))
            device = self.device or (pl_module.device if pl_module.device.type != "cpu" else "cpu")
            self.summary = export(pl_module.model, getattr(pl_module, "tokenizer", None), self.tokens, self.output_dir,
                                  self.config, base_name=base_name, merge_into=self.merge_into, masks=masks,
                                  backend=self.backend, device=device, dtype=self.dtype, overwrite=self.overwrite,
                                  measure_drift=self.measure_drift, progress=self.progress)
            self.checkpoint_path = self.summary["output_dir"]
            for k in ("kl", "max_logit_diff"):
                if "drift" in self.summary and trainer.logger is not None:
                    trainer.logger.log_metrics({f"export/drift_{k}": self.summary["drift"][k]})
        trainer.strategy.barrier("qft-gptq-export")

    # ------------------------------------------------------------------ resume
    def state_dict(self):
        return {"checkpoint_path": self.checkpoint_path, "summary": self.summary, "config": self.config.to_dict()}

    def load_state_dict(self, state_dict):
        self.checkpoint_path = state_dict.get("checkpoint_path")
        self.summary = state_dict.get("summary")
