"""PRILoRA settings: one dataclass, every knob named, validated when it is built.

The paper (Benedek & Wolf, "PRILoRA", Findings of EACL 2024, arXiv 2401.11316) fixes the two ideas
-- linearly increasing ranks and importance-based pruning of ``A`` -- but the sources available to
us do not give its exact pruning schedule or EMA constant. The defaults below are our choices for
LLM fine-tuning runs of a few hundred to a few thousand optimizer steps, and are documented as such.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .math import ALPHA_POLICIES, SPARSITY_SCHEDULES

#: Fractions of the run used when start_step / end_step are left to None.
DEFAULT_START_FRACTION = 0.1
DEFAULT_END_FRACTION = 0.8


def _err(name: str, value, allowed: str, hint: str = "") -> ValueError:
    msg = f"PRILoRAConfig({name}={value!r}): allowed: {allowed}."
    return ValueError(msg + (f" Hint: {hint}" if hint else ""))


@dataclass
class PRILoRAConfig:
    r_start: int = field(default=4, metadata={"help": "LoRA rank of the first decoder layer."})
    r_end: int = field(default=12, metadata={"help": (
        "LoRA rank of the last decoder layer; ranks in between grow linearly. 4 -> 12 averages 8, i.e. the "
        "parameter count of a uniform rank-8 LoRA.")})
    alpha_policy: str = field(default="scale", metadata={"help": (
        "'scale': alpha_l = alpha * r_l / r_ref, so alpha/r (the update scaling) is the same in every layer; "
        "'constant': alpha_l = alpha, so shallow low-rank layers get a larger scaling.")})
    alpha: Optional[float] = field(default=None, metadata={"help": (
        "Reference LoRA alpha. None: the module's `lora_alpha` (16 if it has none).")})
    r_ref: Optional[float] = field(default=None, metadata={"help": (
        "Rank at which alpha applies under 'scale'. None: the module's `lora_r` (8 if it has none).")})
    final_sparsity: float = field(default=0.5, metadata={"help": (
        "Fraction of each row of A pruned at the end of the schedule, in [0, 1). Our default; 0 disables pruning.")})
    sparsity_schedule: str = field(default="cubic", metadata={"help": (
        "'cubic' (Zhu & Gupta 2017: fast early, slow late) or 'linear' ramp from 0 to final_sparsity.")})
    start_step: Optional[int] = field(default=None, metadata={"help": (
        "Optimizer step of the first pruning step. None: 10% of the run (trainer.estimated_stepping_batches), "
        "so the input EMA has warmed up first.")})
    end_step: Optional[int] = field(default=None, metadata={"help": (
        "Optimizer step at which final_sparsity is reached. None: 80% of the run, leaving the last 20% to "
        "recover at fixed sparsity.")})
    interval: int = field(default=10, metadata={"help": (
        "Prune every `interval` optimizer steps between start_step and end_step.")})
    ema_beta: float = field(default=0.95, metadata={"help": (
        "EMA coefficient of the per-feature mean of x_j^2 (per training forward): "
        "ema = beta*ema + (1-beta)*batch. "
        "0.95 averages over roughly the last 20 batches.")})
    regrow: bool = field(default=False, metadata={"help": (
        "False: pruned entries stay pruned. True: every pruning step recomputes the mask from scratch; a pruned "
        "entry is scored with the value it had when pruned and comes back with that value if it wins.")})
    adapter_name: str = field(default="default", metadata={"help": "peft adapter whose LoRA A matrices are pruned."})
    log: bool = field(default=True, metadata={"help": "Log per-layer rank and A-sparsity to the Lightning logger."})
    plot: bool = field(default=True, metadata={"help": (
        "Write a PNG of rank and sparsity per layer next to the checkpoints at fit end.")})

    def __post_init__(self):
        for name in ("r_start", "r_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _err(name, v, "an integer rank >= 1", "LoRA needs at least one rank per layer.")
        if self.r_start > self.r_end:
            raise _err("r_start", self.r_start, f"an integer <= r_end={self.r_end}",
                       "PRILoRA ranks increase with depth; swap r_start and r_end.")
        if self.alpha_policy not in ALPHA_POLICIES:
            raise _err("alpha_policy", self.alpha_policy, str(list(ALPHA_POLICIES)))
        if self.alpha is not None and not self.alpha > 0:
            raise _err("alpha", self.alpha, "a number > 0 or None (use the module's lora_alpha)")
        if self.r_ref is not None and not self.r_ref > 0:
            raise _err("r_ref", self.r_ref, "a number > 0 or None (use the module's lora_r)")
        fs = self.final_sparsity
        if isinstance(fs, bool) or not isinstance(fs, (int, float)) or not 0.0 <= fs < 1.0:
            raise _err("final_sparsity", fs, "a float in [0, 1)", "1.0 would prune whole rows of A; use e.g. 0.5.")
        if self.sparsity_schedule not in SPARSITY_SCHEDULES:
            raise _err("sparsity_schedule", self.sparsity_schedule, str(list(SPARSITY_SCHEDULES)))
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise _err("interval", self.interval, "an integer >= 1", "1 prunes after every optimizer step.")
        for name in ("start_step", "end_step"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise _err(name, v, "an integer optimizer step >= 0, or None for a fraction of the run")
        if self.start_step is not None and self.end_step is not None and self.end_step <= self.start_step:
            raise _err("end_step", self.end_step, f"an integer > start_step={self.start_step}",
                       "the schedule ramps sparsity up between the two steps.")
        if isinstance(self.ema_beta, bool) or not isinstance(self.ema_beta, (int, float)) \
                or not 0.0 <= self.ema_beta < 1.0:
            raise _err("ema_beta", self.ema_beta, "a float in [0, 1)",
                       "0.95 averages over ~20 batches; 0 keeps only the last batch.")
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise _err("adapter_name", self.adapter_name, "a non-empty peft adapter name",
                       "peft's default is 'default'.")

    def resolve_steps(self, total_steps: Optional[float]) -> tuple:
        """``(start_step, end_step)``, filling None from ``total_steps`` (the run's optimizer steps)."""
        start, end = self.start_step, self.end_step
        if start is None or end is None:
            if total_steps is None or total_steps == float("inf") or total_steps < 1:
                raise ValueError(
                    f"PRILoRAConfig(start_step={start!r}, end_step={end!r}): None means a fraction of the run, but "
                    f"the run length is unknown (estimated_stepping_batches={total_steps!r}). "
                    "Hint: set Trainer(max_steps=...) "
                    "or give start_step and end_step explicitly.")
            total = int(total_steps)
            if start is None:
                start = int(DEFAULT_START_FRACTION * total)
            if end is None:
                end = max(int(DEFAULT_END_FRACTION * total), start + 1)
        if end <= start:
            raise ValueError(f"PRILoRAConfig: end_step={end} must be > start_step={start} "
                             "(the run is too short for the schedule; set both explicitly).")
        return start, end

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> str:
        """One line per knob: name, default and meaning (for CLIs and docs)."""
        return "\n".join(f"{f.name}={f.default!r}: {f.metadata.get('help', '')}" for f in fields(cls))
