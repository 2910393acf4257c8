"""``GPTQExportCallback``: merge + GPTQ + HF checkpoint at the end of ``trainer.fit``."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from qft import hooks

from .calibration import (
    DEFAULT_N_SAMPLES,
    DEFAULT_SEQ_LEN,
    GENERAL_FRACTION,
    CalibrationError,
    calibration_mix,
    calibration_tokens,
    model_max_length,
    skip_start,
)
from .checkpoint import check_output_dir
from .config import GPTQConfig
from .merge import DEFAULT_MERGE_INTO, check_merge_into
from .offload import check_offload
from .pipeline import DTYPES, check_backend, check_trained, export, export_config, needs_calibration, road

_D = GPTQConfig()  # the solver knobs' defaults are the config's


class ExportCallback(pl.Callback):
    """What every export callback shares (GPTQ here, W8A8 in ``qft.ptq.callback``): the output directory
    checked in ``__init__``; in ``setup`` an ``"observe"`` model hook (``qft.hooks.when_model_ready``)
    that runs ``_prepare`` once every callback has changed the model, before any training step, on every
    rank; in ``on_fit_end`` ``_export`` on rank zero while the others wait on a barrier; and
    ``state_dict``/``load_state_dict`` of where it wrote, so a resumed run knows.

    A subclass sets ``name`` and implements ``_prepare(pl_module)`` (refuse what cannot be exported,
    build the calibration tokens) and ``_export(trainer, pl_module, base_name, device) -> summary``.
    """

    # qft.sharding: refused under FSDP, where a rank holds only shards
    whole_weights = "the export merges and quantizes every layer's whole weight at fit end"
    name = "export"

    def __init__(self, output_dir, overwrite: bool = False):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self._check_output()
        self.tokens: torch.Tensor | None = None
        self.summary: dict | None = None
        self.checkpoint_path: str | None = None

    def _check_output(self) -> None:
        """Refuse an existing result (a directory here; the GGUF callback writes one file)."""
        check_output_dir(self.output_dir, self.overwrite)

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self._trainer = trainer
        hooks.when_model_ready(pl_module, self._prepare, phase="observe")

    def _source(self, calibration):
        """The calibration source: the one given, else the trainer's DataModule."""
        return calibration if calibration is not None else getattr(getattr(self, "_trainer", None), "datamodule", None)

    def _prepare(self, pl_module):
        raise NotImplementedError

    def _export(self, trainer, pl_module, base_name, device) -> dict:
        raise NotImplementedError

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            base_name = getattr(pl_module, "hparams", {}).get("model", getattr(pl_module, "model_name", None))
            device = self.device or (pl_module.device if pl_module.device.type != "cpu" else "cpu")
            self.summary = self._export(trainer, pl_module, base_name, device)
            self.checkpoint_path = self.summary["output_dir"]
        trainer.strategy.barrier(f"qft-{self.name}-export")

    @property
    def state_key(self) -> str:
        """One per output: two export callbacks in one Trainer (a GPTQ directory and a GGUF file, say)
        checkpoint side by side instead of overwriting each other's state."""
        return self._generate_state_key(output=str(self.output_dir))

    def state_dict(self):
        return {"checkpoint_path": self.checkpoint_path, "summary": self.summary, "config": self.config.to_dict()}

    def load_state_dict(self, state_dict):
        self.checkpoint_path = state_dict.get("checkpoint_path")
        self.summary = state_dict.get("summary")


class GPTQExportCallback(ExportCallback):
    """Export the fine-tuned model as a Hugging Face GPTQ checkpoint when ``fit`` ends.

    Args:
        output_dir: where the checkpoint goes (must not exist unless ``overwrite``).
        bits, group_size, sym: the grid. None (default) follows the grid a ``QATCallback`` in the same
            run trains, or :class:`qft.export.GPTQConfig`'s defaults (4, 128, True) without QAT. Values
            that contradict the trained grid are refused at set-up (unless ``qat_grid="resolve"``).
        desc_act, static_groups, act_group_aware, true_sequential, damp_percent, hessian_dtype, mse, method:
            the solver, see :class:`qft.export.GPTQConfig` (defaults are its defaults; ``method="rtn"`` for
            round-to-nearest, ``"awq"`` for an AWQ checkpoint, ``"none"`` to prune without rounding).
        sparsity, sparsity_pattern, prune_method: pruning in the same export (``qft.export.prune``):
            e.g. ``sparsity=0.5`` with SparseGPT choosing the zeros inside the GPTQ solve.
        qat_grid: for layers QAT trained: ``"keep"`` writes the learned grid as is (bit-exact to the
            fake-quant model, no solve), ``"refine"`` keeps its scales and GPTQ re-solves the codes
            (toward the base on general text, see ``general_target``), ``"resolve"`` solves a new grid
            from the merged weights. None (default): ``"refine"`` with general text, else ``"keep"``.
        calibration: a text file, a list of strings, a token tensor, or a DataModule; ``None`` uses the
            trainer's DataModule.
        general_calibration, general_fraction: general text (a file, strings or tokens) that supplies
            ``general_fraction`` of the windows, the task the rest (``qft.export.calibration_mix``): the
            solve then keeps the base model's general ability, not only the task. None: task only.
        general_start: skip this fraction of ``general_calibration`` (0.5 with WikiText-2 test: its second
            half, disjoint from the standard evaluation windows).
        general_target: what the export reproduces on the general-text windows: ``"base"`` (the released
            base model: the fine-tune's task behaviour is kept on task windows, the base's general ability
            on general text) or ``"trained"`` (the fine-tuned model everywhere: plain GPTQ). None
            (default): ``"base"`` with general text, else ``"trained"``; see BENCHMARKS.md, export roads.
        n_samples, seq_len: calibration windows (``seq_len`` capped at the model's context).
        merge_into: the base of frozen layers: ``"trained"`` (the one the adapters trained on, e.g. the
            dequantized NF4 base) or ``"original"`` (reload the released fp weights); see
            ``qft.export.merge``.
        backend: ``"qft"`` (pure torch) or ``"gptqmodel"`` (needs the ``interop`` extra).
        device: where blocks are quantized (default: the module's device); dtype: forward dtype;
            save_dtype: dtype of the tensors left in floating point ("auto": fp16 for an fp32 model).
        overwrite: replace an existing ``output_dir``.
        reuse_outputs: keep a block's final sub-module outputs for later stages (``False``: recompute them,
            less memory, more time; BENCHMARKS.md has both).
        calibration_offload: where the cached calibration activations wait: ``"none"`` (on ``device``),
            ``"cpu"`` (host memory, for an accelerator) or ``"disk"`` (temporary files); same result.

    Lifecycle
    ---------
    - ``__init__``: validates every argument (grid, solver, backend availability, output dir).
    - ``setup`` (stage ``fit``): registers an ``"observe"`` model hook (``qft.hooks.when_model_ready``)
      that, once every callback has changed the model and before any training step, on every rank:
      finds the decoder blocks, derives the grid (``export_config``: QAT's, if the model has one),
      refuses combinations that cannot be exported as asked (``check_trained``: a QAT grid under an
      unmerged LoRA adapter, a contradicting grid, a backend that cannot keep a learned grid), and
      builds the calibration tokens (missing data or too few tokens fail here).
    - ``on_fit_end``: rank zero merges (``qft.export.merge``), keeps or solves each layer's grid and
      writes the checkpoint; the other ranks wait on a barrier. ``summary`` and ``checkpoint_path``
      hold the result.
    - ``state_dict``/``load_state_dict``: whether the export ran and where, so a resumed run knows.
    """

    name = "gptq"

    def __init__(self, output_dir, bits: int | None = None, group_size: int | None = None, sym: bool | None = None,
                 desc_act: bool = _D.desc_act, static_groups: bool = _D.static_groups,
                 act_group_aware: bool | None = None, true_sequential: bool = _D.true_sequential,
                 damp_percent: float = _D.damp_percent, hessian_dtype: str = _D.hessian_dtype, mse: bool = _D.mse,
                 method: str = _D.method, qat_grid: str | None = None, calibration=None, general_calibration=None,
                 general_fraction: float = GENERAL_FRACTION, general_start: float = 0.0,
                 general_target: str | None = None,
                 n_samples: int = DEFAULT_N_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                 merge_into: str = DEFAULT_MERGE_INTO, backend: str = "qft", device=None, dtype: str = "auto",
                 overwrite: bool = False, measure_drift: bool = True, progress: bool = True, save_dtype: str = "auto",
                 reuse_outputs: bool = True, calibration_offload: str = "none", sparsity: float = _D.sparsity,
                 sparsity_pattern: str = _D.sparsity_pattern, prune_method: str = _D.prune_method):
        super().__init__(output_dir, overwrite)
        self.grid = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym).items() if v is not None}
        self.solver = dict(desc_act=desc_act, static_groups=static_groups, act_group_aware=act_group_aware,
                           true_sequential=true_sequential, damp_percent=damp_percent, hessian_dtype=hessian_dtype,
                           mse=mse, method=method, sparsity=sparsity, sparsity_pattern=sparsity_pattern,
                           prune_method=prune_method)
        self.config = GPTQConfig(**self.grid, **self.solver)  # validates now; set-up may adopt QAT's grid
        self.merge_into = check_merge_into(merge_into, "GPTQExportCallback")
        for arg, value in (("dtype", dtype), ("save_dtype", save_dtype)):
            if value not in DTYPES:
                raise ValueError(f"GPTQExportCallback({arg}={value!r}) is unknown; allowed: {list(DTYPES)}.")
        check_offload(calibration_offload, "GPTQExportCallback(calibration_offload)", backend)
        check_backend(backend)
        if not isinstance(reuse_outputs, bool):
            raise ValueError(f"GPTQExportCallback(reuse_outputs={reuse_outputs!r}): True or False.")
        self.reuse_outputs, self.calibration_offload = reuse_outputs, calibration_offload
        if not isinstance(n_samples, int) or n_samples < 1 or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"GPTQExportCallback(n_samples={n_samples!r}, seq_len={seq_len!r}): need n_samples >= 1 "
                             "and seq_len >= 2 (defaults 128 x 2048).")
        if isinstance(general_calibration, (str, os.PathLike)) and not Path(general_calibration).is_file():
            raise FileNotFoundError(f"GPTQExportCallback(general_calibration={str(general_calibration)!r}): no such "
                                    "file; pass a text file of general text (e.g. WikiText), or None.")
        if isinstance(general_fraction, bool) or not isinstance(general_fraction, (int, float)) \
                or not 0 <= general_fraction <= 1:
            raise ValueError(f"GPTQExportCallback(general_fraction={general_fraction!r}): a number in [0, 1].")
        if isinstance(general_start, bool) or not isinstance(general_start, (int, float)) or not 0 <= general_start < 1:
            raise ValueError(f"GPTQExportCallback(general_start={general_start!r}): a number in [0, 1) (0.5: the "
                             "second half of the general text).")
        self.general_start = general_start
        self.general_rows = round(n_samples * general_fraction) if general_calibration is not None else 0
        self.qat_grid, self.general_target = road(qat_grid, general_target, self.general_rows, n_samples,
                                                  "GPTQExportCallback", backend)
        self.calibration, self.n_samples, self.seq_len = calibration, n_samples, seq_len
        self.general_calibration, self.general_fraction = general_calibration, general_fraction
        self.backend, self.device, self.dtype, self.save_dtype = backend, device, dtype, save_dtype
        self.measure_drift, self.progress = measure_drift, progress
        self._anchoring = dict(general_rows=self.general_rows, general_target=self.general_target)

    # ------------------------------------------------------------------ checks before training
    def _check(self, model) -> None:
        self.config = export_config(model, self.qat_grid, **self.grid, **self.solver)
        check_trained(model, self.config, self.qat_grid, self.backend)

    def _prepare(self, pl_module):
        model = pl_module.model if hasattr(pl_module, "model") else pl_module
        self._check(model)
        source = self._source(self.calibration)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if needs_calibration(model, self.config, self.qat_grid):
            general = skip_start(self.general_calibration, self.general_start)
            self.tokens = calibration_mix(source, general, tokenizer, self.n_samples, self.seq_len,
                                          self.general_fraction, max_length=model_max_length(model))
            return
        self._anchoring = dict(general_rows=0, general_target="trained")  # nothing is solved, nothing to anchor
        # The learned grid is written as is: tokens serve only the drift check (qft.export.merge.drift),
        # which reads at most 4 x 256 of them; without enough data it is skipped, never an error.
        try:
            self.tokens = calibration_tokens(source, tokenizer, 4, min(self.seq_len, 256),
                                             max_length=model_max_length(model))
        except CalibrationError:
            self.tokens = None

    # ------------------------------------------------------------------ the export
    def _export(self, trainer, pl_module, base_name, device) -> dict:
        self._check(pl_module.model)  # a callback may have changed the model since set-up (convert)
        summary = export(pl_module.model, getattr(pl_module, "tokenizer", None), self.tokens, self.output_dir,
                         self.config, base_name=base_name, merge_into=self.merge_into, backend=self.backend,
                         device=device, dtype=self.dtype, overwrite=self.overwrite, measure_drift=self.measure_drift,
                         progress=self.progress, qat_grid=self.qat_grid, save_dtype=self.save_dtype,
                         reuse_outputs=self.reuse_outputs, calibration_offload=self.calibration_offload,
                         **self._anchoring)
        if trainer.logger is not None:
            for key in ("drift", "export_drift"):
                for k, v in (summary.get(key) or {}).items():
                    if k in ("kl", "max_logit_diff"):
                        trainer.logger.log_metrics({f"export/{key}_{k}": v})
        return summary
