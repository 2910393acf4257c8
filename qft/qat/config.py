"""``QATConfig``: every knob of quantization-aware training, validated when it is built.

The callback (``QATCallback``) and the functional API (``prepare``) both take this one object, so a
bad scheme fails at construction, before any model is loaded. The only check that needs the model
(does ``group_size`` divide each target's ``in_features``?) lives in ``QATConfig.check_model``,
which the callback runs before training starts and users may call up front.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Sequence, Union

from qft.quant import QuantScheme
from qft.quant.scheme import GRANULARITIES, WEIGHT_GRANULARITIES

from .solve import GridSolve, as_grid_solve

ACT_GRANULARITIES = ("per_token", "per_tensor")


def _scheme(value, arg: str) -> QuantScheme:
    """Accept a ``QuantScheme`` or a dict of its fields (what YAML gives), with errors naming ``arg``."""
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, dict):
        try:
            return QuantScheme(**value)
        except TypeError as e:
            raise ValueError(f"QATCallback({arg}={value!r}): {e}. Fields of QuantScheme: bits, group_size, "
                             f"symmetric, granularity ({list(GRANULARITIES)}), dynamic.") from None
        except ValueError as e:
            raise ValueError(f"QATCallback({arg}=...): {e}") from None
    raise TypeError(f"QATCallback({arg}={value!r}): expected a qft.quant.QuantScheme (or a dict of its fields), "
                    f"got {type(value).__name__}. Hint: {arg}=QuantScheme(bits=4, group_size=128).")


def _patterns(value, arg: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"QATCallback({arg}={value!r}): expected a list of non-empty module-name patterns such as "
                        "['lm_head'] or ['q_proj', 'mlp.*'].")
    return tuple(value)


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """peft-style matching: a pattern matches a module name exactly or as a dotted suffix; globs allowed."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p)
               or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


@dataclass
class QATConfig:
    """Configuration of fake-quant training; see ``QATCallback`` for the lifecycle."""

    weight: QuantScheme = field(default_factory=lambda: QuantScheme(bits=4, group_size=128, symmetric=True),
                                metadata={"help": "Weight grid (per_group or per_channel, 2-8 bits); the export grid."})
    activation: Optional[QuantScheme] = field(default=None, metadata={
        "help": "Input-activation grid: None, per_token with dynamic=True, or per_tensor (moving-average min/max "
                "observer when dynamic=False)."})
    start_step: int = field(default=0, metadata={"help": "Global step at which fake-quant switches on."})
    freeze_observers_step: Optional[int] = field(default=None, metadata={
        "help": "Global step from which activation observers stop updating (None: never)."})
    ignore: Sequence[str] = field(default=("lm_head",), metadata={"help": "Module-name patterns never quantized."})
    targets: Optional[Sequence[str]] = field(default=None, metadata={
        "help": "Module-name patterns to quantize (None: every nn.Linear not ignored)."})
    range_learning: bool = field(default=False, metadata={
        "help": "Make weight scales (and asymmetric zero points) trainable, LSQ-style."})
    lr_multiplier: float = field(default=0.05, metadata={
        "help": "Learning-rate multiplier of learned scales/zeros (range_learning). 0.05: on a full fine-tune of "
                "SmolLM2-135M, int4 g64, slower scales recovered more of round-to-nearest's loss on both seeds "
                "measured (seed 0: 73.4% at 1x, 76.3% at 0.2x, 77.8% at 0.05x; seed 1: 71.7%, 74.7%, 81.6%; "
                "BENCHMARKS.md, QAT recovery)."})
    lora_merged: Optional[bool] = field(default=None, metadata={
        "help": "For peft LoRA layers (plain or NF4 base) fake-quantize the merged W + scaling*B@A, which is what "
                "every export writes. None (default) = True. False fake-quantizes the base weight alone with the "
                "adapter in full precision on top (torchtune's QAT+LoRA); such a model cannot be exported on its "
                "learned grid, so GPTQExportCallback refuses it."})
    observer_momentum: float = field(default=0.01, metadata={
        "help": "Moving-average constant of the per_tensor activation observer (0 < m <= 1)."})
    allow_partial_groups: bool = field(default=False, metadata={
        "help": "Let group_size leave a short last group (in_features % group_size != 0), as the GPTQ layout "
                "and AutoGPTQ/GPTQModel allow; off by default so a non-dividing group_size is an error."})
    convert_on_fit_end: bool = field(default=False, metadata={
        "help": "Replace fake-quant layers by packed GPTQLinear when fit ends (irreversible)."})
    init: Union[Literal["minmax", "mse", "gptq", "rtn"], GridSolve, None] = field(default="minmax", metadata={
        "help": "The grid fake-quant trains on. 'minmax': each step's scales from the weight itself (with "
                "range_learning: the learned scales start at each group's range). 'mse' (range_learning only): the "
                "learned scales start at the clipping search's range (qft.quant.grid.clipped_params). 'gptq' (or a "
                "qft.qat.GridSolve with general text): solved once at start_step by GPTQ on calibration windows, "
                "then fixed, so the adapters train against the grid the export writes ('keep'); 'rtn': the same "
                "from round-to-nearest. See qft.qat.solve."})

    def __post_init__(self):
        self.weight = _scheme(self.weight, "weight")
        if self.weight.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"QATCallback(weight=QuantScheme(granularity={self.weight.granularity!r})): weights are "
                             f"quantized {list(WEIGHT_GRANULARITIES)}; per_token/per_tensor are activation grids.")
        if self.activation is not None:
            self.activation = _scheme(self.activation, "activation")
            if self.activation.granularity not in ACT_GRANULARITIES:
                raise ValueError(
                    f"QATCallback(activation=QuantScheme(granularity={self.activation.granularity!r})): activations "
                    f"are quantized {list(ACT_GRANULARITIES)}. Hint: QuantScheme(bits=8, granularity='per_token', "
                    "dynamic=True).")
        for arg in ("start_step",):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QATCallback({arg}={v!r}): expected an integer >= 0.")
        f = self.freeze_observers_step
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < self.start_step):
            raise ValueError(f"QATCallback(freeze_observers_step={f!r}): expected None or an integer >= start_step "
                             f"({self.start_step}); observers must see data before they freeze.")
        self.ignore = _patterns(self.ignore, "ignore")
        self.targets = None if self.targets is None else _patterns(self.targets, "targets")
        if self.targets == ():
            raise ValueError("QATCallback(targets=[]): no module would be quantized; use None for every nn.Linear.")
        for arg in ("range_learning", "allow_partial_groups", "convert_on_fit_end"):
            if not isinstance(getattr(self, arg), bool):
                raise TypeError(f"QATCallback({arg}={getattr(self, arg)!r}): expected True or False.")
        if self.lora_merged is not None and not isinstance(self.lora_merged, bool):
            raise TypeError(f"QATCallback(lora_merged={self.lora_merged!r}): expected None (= True), True or False.")
        lm = self.lr_multiplier
        if isinstance(lm, bool) or not isinstance(lm, (int, float)) or not lm > 0:
            raise ValueError(f"QATCallback(lr_multiplier={lm!r}): expected a positive number (1.0 = the model's lr).")
        m = self.observer_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
            raise ValueError(f"QATCallback(observer_momentum={m!r}): expected a number in (0, 1], e.g. 0.01.")
        if self.init == "mse":
            if not self.range_learning:
                raise ValueError("QATCallback(init='mse'): the clipping search sets where learned scales start; it "
                                 "needs range_learning=True (min-max fake-quant recomputes its scales every step). "
                                 "Hint: init='mse', range_learning=True.")
        else:
            self.init = as_grid_solve(self.init) or "minmax"
        if self.solve is not None and self.range_learning:
            raise ValueError("QATCallback(init='gptq', range_learning=True): a solved grid keeps the scales GPTQ "
                             "chose, and range_learning would learn new ones. Pick one: init='minmax' with "
                             "range_learning, or a solved grid without it.")
        if self.solve is not None and not self.merges_lora:
            raise ValueError("QATCallback(init='gptq', lora_merged=False): the solved grid is the merged weight's "
                             "(W + scaling * B @ A); use lora_merged=None (True).")

    @property
    def solve(self) -> GridSolve | None:
        """How the grid is solved at ``start_step``, or None for min-max scales."""
        return self.init if isinstance(self.init, GridSolve) else None

    @property
    def merges_lora(self) -> bool:
        """Whether LoRA layers are fake-quantized merged (``lora_merged`` None or True)."""
        return self.lora_merged is not False

    def is_target(self, name: str) -> bool:
        """Whether the module called ``name`` (peft's ``.base_layer`` suffix stripped) is quantized."""
        name = name.removesuffix(".base_layer")
        if name_matches(name, self.ignore):
            return False
        return self.targets is None or name_matches(name, self.targets)

    def check_model(self, model) -> list:
        """Validate this config against a built model; returns the target names (raises naming the module).

        ``model`` is any ``nn.Module`` (a LightningModule included). Call it up front to fail before a
        long job; the callback calls it before the first swap.
        """
        from .prepare import find_targets

        found = find_targets(model, self)
        if not found:
            raise ValueError(f"QATCallback(targets={self.targets!r}, ignore={list(self.ignore)!r}) matched no linear "
                             "layer (plain, NF4 or LoRA; see qft.layers) in the model; check the patterns against "
                             "model.named_modules().")
        for name, (in_f, out_f) in found.items():
            if not self.allow_partial_groups:
                try:
                    self.weight.check_layer(name, in_f)
                except ValueError as e:
                    raise ValueError(f"{e} Or set allow_partial_groups=True (a short last group, as in GPTQ "
                                     "checkpoints).") from None
            if in_f % 32 or out_f % 32:
                raise ValueError(f"QATCallback: module {name!r} has in_features={in_f}, out_features={out_f}; "
                                 "the GPTQ layout that convert/export write packs both in multiples of 32. Add "
                                 f"{name.rsplit('.', 1)[-1]!r} to `ignore`.")
        return list(found)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight"] = self.weight.to_dict()
        d["activation"] = None if self.activation is None else self.activation.to_dict()
        d["ignore"], d["targets"] = list(self.ignore), None if self.targets is None else list(self.targets)
        d["init"] = self.init.to_dict() if isinstance(self.init, GridSolve) else self.init
        return d
