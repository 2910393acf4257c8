"""``QATCallback``: quantization-aware training as a Lightning callback."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from qft.hooks import record_change, when_model_ready
from qft.quant import QuantScheme

from .config import QATConfig
from .convert import convert
from .prepare import fake_quant_modules, is_converted, prepare, set_state

SCALE_GROUP = "qat_scales"


class QATCallback(pl.Callback):
    """Fake-quantize target linears on the export grid while training; optionally convert at the end.

    Args (details in ``QATConfig``'s field help):
        weight: the weight grid, a ``QuantScheme`` (or dict): per_group/per_channel, 2-8 bits, sym/asym.
        activation: ``None``, ``QuantScheme(bits=8, granularity="per_token", dynamic=True)`` or a
            ``per_tensor`` scheme (moving-average min/max observer, all-reduced across DDP ranks).
        start_step: global step from which fake-quant is on (plain training before).
        freeze_observers_step: global step from which activation observers stop updating.
        ignore / targets: module-name patterns (exact, dotted suffix or glob) excluded / included.
        range_learning, lr_multiplier: LSQ-learned scales (and asymmetric zeros) at ``lr * lr_multiplier``.
        lora_merged: for peft LoRA layers, fake-quantize ``W + scaling * B @ A`` (the merged export weight);
            None (default) = True; False fake-quantizes the base alone (not exportable on its learned grid).
        observer_momentum: moving-average constant of per_tensor observers.
        allow_partial_groups: accept a short last group when ``group_size`` does not divide ``in_features``.
        convert_on_fit_end: convert to packed ``GPTQLinear`` when fit ends.
        init: the grid fake-quant trains on: ``"minmax"`` (each step's scales from the weight) or a grid
            solved once at ``start_step`` and then fixed: ``"gptq"``, ``"rtn"`` or a ``qft.qat.GridSolve``
            (GPTQ on task windows and, given a general-text file, general windows anchored to the base).

    Lifecycle:
    - ``__init__``: every argument is validated (``QATConfig``); bad schemes fail here.
    - ``setup`` (any stage): registers the swap with ``qft.hooks.when_model_ready(..., "final")``, which
      runs it inside ``configure_model`` for qft modules (before DDP/FSDP wrapping and before a
      checkpoint's weights are loaded) or at once for any other LightningModule. The swap first checks
      every target against the scheme (``group_size`` must divide ``in_features``; the error names the
      module), then replaces each target ``nn.Linear`` (or peft LoRA linear, ``lora_merged=True``) by a
      ``FakeQuantLinear``/``FakeQuantLoRALinear``. Already swapped models are left as they are (fitting
      twice); a converted model cannot be fitted again (clear error).
    - ``on_fit_start`` (optimizers exist, optimizer state not yet restored): with ``range_learning``,
      moves the learned scales/zeros into their own param group at ``lr * lr_multiplier``.
    - ``on_fit_start`` with a solved ``init``: builds its calibration windows (the trainer's DataModule,
      the general-text file), so missing data fails before the first step.
    - ``on_train_batch_start``: sets fake-quant on from ``start_step`` and freezes activation observers
      from ``freeze_observers_step`` (by ``trainer.global_step``, so resuming lands on the same state).
      With a solved ``init``, the first batch at ``start_step`` solves the grid (``qft.qat.solve``) and
      every fake-quant layer trains on it from then on; rank 0's grid is broadcast to the others.
    - ``on_train_end``: a solved ``init`` with ``start_step == max_steps`` is solved here, so the fit ends
      on the grid with no step trained on it (what the demo measured best: BENCHMARKS.md, "Main job"),
      before any export callback's ``on_fit_end``.
    - ``on_fit_end``: ``qft.qat.convert`` when ``convert_on_fit_end=True``; validate/test afterwards run
      the packed model.
    - checkpoints: scales, zeros, observer statistics and on/off flags are module buffers (or parameters)
      and travel in ``state_dict``; the callback's ``state_dict`` holds its config and step counters.
      ``qft.qat.restore`` rebuilds the fake-quant layers in a fresh module from a checkpoint.
    """

    @property
    def whole_weights(self) -> str | None:
        """Why this callback cannot run on FSDP shards (``qft.sharding``), or ``None``: min-max fake-quant
        trains sharded; learned scales and the conversion at fit end need whole weights."""
        if self.config.range_learning:
            return ("range_learning=True sets the learned scales from the whole weight inside the first fake-quant "
                    "forward, and FSDP does not keep writes into its gathered parameters (min-max scales work)")
        if self.config.convert_on_fit_end:
            return "convert_on_fit_end=True packs whole weights at fit end (convert from the checkpoint instead)"
        if self.config.solve is not None:
            return f"init={self.config.solve.method!r} solves each layer's whole weight at start_step"
        return None

    def __init__(self, weight: QuantScheme = QuantScheme(bits=4, group_size=128, symmetric=True),
                 activation: Optional[QuantScheme] = None, start_step: int = 0,
                 freeze_observers_step: Optional[int] = None, ignore: Sequence[str] = ("lm_head",),
                 targets: Optional[Sequence[str]] = None, range_learning: bool = False, lr_multiplier: float = 0.05,
                 lora_merged: Optional[bool] = None, observer_momentum: float = 0.01,
                 allow_partial_groups: bool = False, convert_on_fit_end: bool = False, init="minmax"):
        self.config = QATConfig(weight=weight, activation=activation, start_step=start_step,
                                freeze_observers_step=freeze_observers_step, ignore=ignore, targets=targets,
                                range_learning=range_learning, lr_multiplier=lr_multiplier, lora_merged=lora_merged,
                                observer_momentum=observer_momentum, allow_partial_groups=allow_partial_groups,
                                convert_on_fit_end=convert_on_fit_end, init=init)
        self.swapped: list = []
        self.last_step = -1
        self.converted = False
        self.solved: dict | None = None  # what the grid solve did (qft.qat.solve), once it ran
        self._tokens = None

    # ----------------------------------------------------------------- model change
    def setup(self, trainer, pl_module, stage: str) -> None:
        when_model_ready(pl_module, lambda m: self._prepare(m, stage), "final")

    def _prepare(self, pl_module, stage: str) -> None:
        if is_converted(pl_module):
            if stage == "fit":
                prepare(pl_module, self.config)  # raises the "already converted" error
            return  # validate/test/predict of a converted model: nothing to fake-quantize
        if stage == "fit" and self.config.solve is not None:
            _refuse_self_teacher(pl_module)
        self.swapped = sorted(set(self.swapped) | set(prepare(pl_module, self.config)))
        record_change(pl_module, "qft.qat.restore.rebuild", self.config.to_dict())
        if stage == "fit" and self.last_step < 0:
            self._apply_schedule(pl_module, 0)

    def validate_model(self, model) -> list:
        """Check the config against ``model`` (any nn.Module) without changing it; returns target names."""
        return self.config.check_model(model)

    # ----------------------------------------------------------------- optimizer
    def on_fit_start(self, trainer, pl_module) -> None:
        solve = self.config.solve
        if solve is not None and self.solved is None and solve.method == "gptq":
            from .solve import calibration

            model = pl_module.model if hasattr(pl_module, "model") else pl_module
            self._tokens = calibration(solve, trainer.datamodule, getattr(pl_module, "tokenizer", None), model)
            if not solve.general_rows:
                rank_zero_warn("QATCallback(init='gptq') without general_calibration: the grid is solved on task "
                               "windows alone, so the base's general ability is not protected. Pass "
                               "init=GridSolve(general_calibration=<a text file>) to keep it.")
        if not self.config.range_learning:
            return
        params = [p for _, m in fake_quant_modules(pl_module) for p in m.qat_params() if p.requires_grad]
        for opt in trainer.optimizers:
            _own_param_group(opt, params, self.config.lr_multiplier, trainer.lr_scheduler_configs)

    # ----------------------------------------------------------------- schedule
    def _apply_schedule(self, pl_module, step: int) -> None:
        c = self.config
        observing = c.freeze_observers_step is None or step < c.freeze_observers_step
        set_state(pl_module, enabled=step >= c.start_step, observing=observing)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._advance(trainer, pl_module)

    def _advance(self, trainer, pl_module) -> None:
        """Solve a grid that is due, then set fake-quant and observers for ``trainer.global_step``."""
        step = trainer.global_step
        if self.config.solve is not None and step >= self.config.start_step and self.solved is None:
            self._solve(trainer, pl_module, step)
        self._apply_schedule(pl_module, step)
        self.last_step = step

    def _solve(self, trainer, pl_module, step: int) -> None:
        from .solve import solve_and_install

        mods = fake_quant_modules(pl_module)
        if mods and all(m.fixed_grid for _, m in mods):  # resumed from a checkpoint taken after the solve
            self.solved = {"step": step, "restored": True}
            return
        base = getattr(pl_module, "hparams", {}).get("model", getattr(pl_module, "model_name", None))
        if self._tokens is None and self.config.solve.method == "gptq":  # resumed before the solve
            from .solve import calibration

            model = pl_module.model if hasattr(pl_module, "model") else pl_module
            self._tokens = calibration(self.config.solve, trainer.datamodule, getattr(pl_module, "tokenizer", None),
                                       model)
        self.solved = {"step": step, **solve_and_install(pl_module, self.config.weight, self.config.solve,
                                                         self._tokens, base)}
        self._tokens = None
        rank_zero_info(f"QAT: grid solved at step {step} by {self.solved['method']} for {self.solved['layers']} "
                       f"layers ({self.solved['general_rows']} general-text windows) in {self.solved['seconds']} s")

    def on_train_end(self, trainer, pl_module) -> None:
        """A grid due at the fit's last step (``start_step == max_steps``) is solved here, once training
        ends and before any ``on_fit_end`` export: the fit ends on the grid, with no step trained on it."""
        if self.config.solve is not None and self.solved is None and trainer.global_step >= self.config.start_step:
            self._advance(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.config.convert_on_fit_end:
            convert(pl_module)
            self.converted = True

    # ----------------------------------------------------------------- checkpoints
    @property
    def state_key(self) -> str:
        return "QATCallback"

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "swapped": list(self.swapped), "last_step": self.last_step,
                "converted": self.converted, "solved": self.solved}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("config", {})
        mine = self.config.to_dict()
        diff = {k: (saved[k], mine[k]) for k in ("weight", "activation", "range_learning", "lora_merged", "init")
                if k in saved and saved[k] != mine[k]}
        if diff:
            raise ValueError(f"QATCallback: the checkpoint was trained with different fake-quant settings "
                             f"(checkpoint, this callback): {diff}. Build the callback with the checkpoint's settings.")
        self.swapped = list(state_dict.get("swapped", []))
        self.last_step = int(state_dict.get("last_step", -1))
        self.converted = bool(state_dict.get("converted", False))
        self.solved = state_dict.get("solved")


def _refuse_self_teacher(pl_module) -> None:
    """A solved grid and a self-teacher on adapters do not go together: refuse before the first step."""
    from qft import layers

    if not getattr(getattr(pl_module, "teacher", None), "is_self", False):
        return
    model = pl_module.model if hasattr(pl_module, "model") else pl_module
    if any(not layers.base_trainable(m) for m in layers.linear_layers(layers.unwrap(model)).values()):
        raise ValueError("QATCallback(init='gptq') with DistillConfig(teacher='self'): once the grid is solved, the "
                         "adapters train for that grid, and the same adapters without fake-quant (the self-teacher) "
                         "stop being a meaningful model (WikiText-2 perplexity above 1e5 on the demo, BENCHMARKS.md). "
                         "Hint: name a full-precision teacher (teacher='smollm2-135m'), or use init='minmax'.")


def _own_param_group(opt: torch.optim.Optimizer, params: list, mult: float, scheduler_configs) -> None:
    """Move ``params`` out of ``opt``'s groups into one group at ``lr * mult`` (no weight decay).

    Done before optimizer state is restored, so resumed checkpoints see the same group layout.
    Schedulers created with the optimizer are extended with the new group (base_lrs, lr_lambdas).
    """
    ids = {id(p) for p in params}
    if not ids or any(g.get("name") == SCALE_GROUP for g in opt.param_groups):
        return
    holding = [g for g in opt.param_groups if any(id(p) in ids for p in g["params"])]
    if holding and all(all(id(p) in ids for p in g["params"]) for g in holding):
        for g in holding:  # the module already grouped them (qft_lr_scale); scales must not decay
            g["weight_decay"] = 0.0
        return
    source = None
    for i, g in enumerate(opt.param_groups):
        kept = [p for p in g["params"] if id(p) not in ids]
        if len(kept) != len(g["params"]):
            source = i if source is None else source
            g["params"] = kept
    if source is None:
        warnings.warn("QATCallback(range_learning=True): the optimizer holds none of the learned scales; they "
                      "will not train. Build the optimizer from all requires_grad parameters.", stacklevel=2)
        return
    group = {k: v for k, v in opt.param_groups[source].items() if k != "params"}
    base = group.get("initial_lr", group["lr"])
    group.update(params=list(params), lr=group["lr"] * mult, initial_lr=base * mult, weight_decay=0.0,
                 name=SCALE_GROUP)
    opt.add_param_group(group)
    for cfg in scheduler_configs:
        sch = cfg.scheduler
        if getattr(sch, "optimizer", None) is not opt:
            continue
        if hasattr(sch, "base_lrs"):
            sch.base_lrs.append(base * mult)
        if hasattr(sch, "lr_lambdas"):
            sch.lr_lambdas.append(sch.lr_lambdas[source])
        if hasattr(sch, "_last_lr"):
            sch._last_lr.append(group["lr"])
