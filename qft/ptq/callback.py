"""``W8A8ExportCallback``: merge + int8 weights and activations + compressed-tensors checkpoint when fit ends."""
from __future__ import annotations

from dataclasses import replace

from qft.export.calibration import DEFAULT_N_SAMPLES, calibration_tokens, model_max_length
from qft.export.callback import ExportCallback
from qft.export.merge import DEFAULT_MERGE_INTO, check_merge_into
from qft.export.pipeline import DTYPES

from .config import ACTIVATIONS, W8A8Config
from .learned import check_qat_grid, learned_activation, learned_w8a8
from .model import needs_calibration

DEFAULT_SEQ_LEN = 512  # W8A8's protocol in BENCHMARKS.md (128 x 512); ranges need less context than GPTQ


class W8A8ExportCallback(ExportCallback):
    """Export the fine-tuned model as a W8A8 compressed-tensors checkpoint (vLLM's int8) when ``fit`` ends.

    Args:
        output_dir: where the checkpoint goes (must not exist unless ``overwrite``).
        activation: ``"dynamic"`` (per token at run time) or ``"static"`` (one calibrated scale per layer
            input). None (default): what a ``QATCallback(activation=...)`` in the same run trains, else
            ``"dynamic"``.
        smoothquant, weight_method, damp_percent: see :class:`qft.ptq.W8A8Config`.
        qat_grid: for a model QAT trained on an int8 per-channel grid: ``"keep"`` (default) writes the
            learned codes, scales and static input ranges; ``"resolve"`` quantizes the merged weights anew.
        calibration: a text file, a list of strings, a token tensor or a DataModule; None uses the
            trainer's DataModule. Read only when something is measured (static ranges QAT did not learn,
            SmoothQuant, GPTQ weights).
        n_samples, seq_len: calibration windows (``seq_len`` capped at the model's context).
        merge_into, device, dtype, save_dtype, overwrite, progress: as for ``GPTQExportCallback``.

    Lifecycle
    ---------
    - ``__init__``: validates every argument (the config, the output directory).
    - ``setup`` (stage ``fit``): once every callback has changed the model and before any training step,
      on every rank: picks the activation mode QAT trains (if ``activation`` is None), refuses a learned
      grid a W8A8 checkpoint cannot hold (``qft.ptq.learned``: a 4-bit or grouped grid, other activation
      modes, SmoothQuant over a learned grid) and builds the calibration tokens if anything is measured.
    - ``on_fit_end``: rank zero merges, quantizes and writes (``qft.ptq.export.export_w8a8``); the other
      ranks wait on a barrier. ``summary`` and ``checkpoint_path`` hold the result.
    - ``state_dict``/``load_state_dict``: whether the export ran and where.
    """

    name = "w8a8"

    def __init__(self, output_dir, activation: str | None = None, smoothquant: float | None = None,
                 weight_method: str = "rtn", damp_percent: float = 0.01, qat_grid: str = "keep", calibration=None,
                 n_samples: int = DEFAULT_N_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                 merge_into: str = DEFAULT_MERGE_INTO, device=None, dtype: str = "auto", save_dtype: str = "auto",
                 overwrite: bool = False, progress: bool = True):
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"W8A8ExportCallback(activation={activation!r}) is unknown; allowed: None (what QAT "
                             f"trains, else dynamic) or one of {list(ACTIVATIONS)}.")
        self.follow_qat = activation is None
        self.config = W8A8Config(activation=activation or "dynamic", smoothquant=smoothquant,
                                 weight_method=weight_method, damp_percent=damp_percent)
        self.qat_grid = check_qat_grid(qat_grid)
        self.merge_into = check_merge_into(merge_into, "W8A8ExportCallback")
        for arg, value in (("dtype", dtype), ("save_dtype", save_dtype)):
            if value not in DTYPES:
                raise ValueError(f"W8A8ExportCallback({arg}={value!r}) is unknown; allowed: {list(DTYPES)}.")
        if not isinstance(n_samples, int) or n_samples < 1 or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"W8A8ExportCallback(n_samples={n_samples!r}, seq_len={seq_len!r}): need n_samples >= 1 "
                             f"and seq_len >= 2 (defaults {DEFAULT_N_SAMPLES} x {DEFAULT_SEQ_LEN}).")
        super().__init__(output_dir, overwrite)
        self.calibration, self.n_samples, self.seq_len = calibration, n_samples, seq_len
        self.device, self.dtype, self.save_dtype, self.progress = device, dtype, save_dtype, progress

    def _check(self, model, before_training: bool = False) -> tuple[dict, dict]:
        if self.follow_qat and self.qat_grid == "keep":
            self.config = replace(self.config, activation=learned_activation(model) or "dynamic")
        return learned_w8a8(model, self.config, self.qat_grid, before_training)

    def _prepare(self, pl_module):
        from qft import layers

        model = pl_module.model if hasattr(pl_module, "model") else pl_module
        fixed, scales = self._check(model, before_training=True)
        if needs_calibration(layers.unwrap(model), self.config, fixed, scales):
            self.tokens = calibration_tokens(self._source(self.calibration), getattr(pl_module, "tokenizer", None),
                                             self.n_samples, self.seq_len, max_length=model_max_length(model))

    def _export(self, trainer, pl_module, base_name, device) -> dict:
        from .export import export_w8a8

        self._check(pl_module.model)  # a callback may have changed the model since set-up (convert)
        return export_w8a8(pl_module.model, getattr(pl_module, "tokenizer", None), self.tokens, self.output_dir,
                           self.config, base_name=base_name, merge_into=self.merge_into, device=device,
                           dtype=self.dtype, save_dtype=self.save_dtype, overwrite=self.overwrite,
                           progress=self.progress, qat_grid=self.qat_grid)
