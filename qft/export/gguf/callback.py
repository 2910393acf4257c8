"""``GGUFExportCallback``: merge + GGUF (llama.cpp) file when ``trainer.fit`` ends."""
from __future__ import annotations

from qft.export.calibration import calibration_tokens, model_max_length
from qft.export.callback import ExportCallback
from qft.export.merge import DEFAULT_MERGE_INTO, check_merge_into

from .config import GGUFConfig
from .export import QAT_GRIDS, check_trained, export_trained, plan
from .writer import check_output_file

DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN = 128, 512  # benchmarks/gguf_vs_llamacpp.py's calibration


class GGUFExportCallback(ExportCallback):
    """Write the fine-tuned model as one GGUF file for llama.cpp (Ollama, LM Studio) when ``fit`` ends.

    Args:
        output: the ``.gguf`` file to write (must not exist unless ``overwrite``).
        quant, method, damp_percent, tokenizer_pre: see :class:`qft.export.gguf.GGUFConfig`
            (``"Q4_K_M"`` with ``"gptq"`` by default).
        qat_grid: for a model QAT trained: ``"keep"`` (default) writes the learned codes and scales where
            they are the mix's own format (int4 or int8, group 32, symmetric: Q4_0 and Q8_0) and refuses
            any other grid at set-up; ``"resolve"`` rounds the merged weights to the GGUF mix anew.
        calibration: a text file, a list of strings, a token tensor or a DataModule; None uses the
            trainer's DataModule. Not read with ``method="rtn"``.
        n_samples, seq_len: calibration windows (``seq_len`` capped at the model's context).
        merge_into, device, overwrite, progress: as for ``GPTQExportCallback``.

    Lifecycle
    ---------
    - ``__init__``: validates every argument (the config, the output file).
    - ``setup`` (stage ``fit``): once every callback has changed the model and before any training step,
      on every rank: refuses a model that cannot be written (not Llama-style, a QAT grid the mix does
      not hold without ``qat_grid="resolve"``, rows no block divides) and builds the calibration tokens
      unless every layer's learned grid is written as it is.
    - ``on_fit_end``: rank zero merges and writes (``qft.export.gguf.export_trained``); the other ranks
      wait on a barrier. ``summary`` and ``checkpoint_path`` (the file) hold the result.
    - ``state_dict``/``load_state_dict``: whether the export ran and where.
    """

    name = "gguf"

    def __init__(self, output, quant: str = "Q4_K_M", method: str = "gptq", damp_percent: float = 0.01,
                 tokenizer_pre: str = "auto", qat_grid: str = "keep", calibration=None,
                 n_samples: int = DEFAULT_N_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                 merge_into: str = DEFAULT_MERGE_INTO, device=None, overwrite: bool = False, progress: bool = True):
        self.config = GGUFConfig(quant=quant, method=method, damp_percent=damp_percent, tokenizer_pre=tokenizer_pre)
        if qat_grid not in QAT_GRIDS:
            raise ValueError(f"GGUFExportCallback(qat_grid={qat_grid!r}) is unknown; allowed: {list(QAT_GRIDS)} "
                             "('resolve' rounds a QAT-trained model to the GGUF mix anew).")
        if not isinstance(n_samples, int) or n_samples < 1 or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"GGUFExportCallback(n_samples={n_samples!r}, seq_len={seq_len!r}): need n_samples >= 1 "
                             f"and seq_len >= 2 (defaults {DEFAULT_N_SAMPLES} x {DEFAULT_SEQ_LEN}).")
        self.qat_grid = qat_grid
        self.merge_into = check_merge_into(merge_into, "GGUFExportCallback")
        self.calibration, self.n_samples, self.seq_len = calibration, n_samples, seq_len
        self.device, self.progress = device, progress
        super().__init__(output, overwrite)

    def _check_output(self) -> None:
        check_output_file(self.output_dir, self.overwrite)

    def _prepare(self, pl_module):
        model = pl_module.model if hasattr(pl_module, "model") else pl_module
        check_trained(model, self.qat_grid, "GGUFExportCallback", self.config.quant)
        plan(model, self.config)  # rows no block divides: refused now, not after training
        from qft import layers

        keeps = self.qat_grid == "keep" and layers.learned_scheme(model) is not None
        if self.config.needs_calibration and not keeps:  # a kept grid is written as learned: no data read
            self.tokens = calibration_tokens(self._source(self.calibration), getattr(pl_module, "tokenizer", None),
                                             self.n_samples, self.seq_len, max_length=model_max_length(model))

    def _export(self, trainer, pl_module, base_name, device) -> dict:
        return export_trained(pl_module.model, getattr(pl_module, "tokenizer", None), self.tokens, self.output_dir,
                              self.config, base_name=base_name, merge_into=self.merge_into, qat_grid=self.qat_grid,
                              overwrite=self.overwrite, device=device, progress=self.progress)
