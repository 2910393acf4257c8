"""``DistillConfig``: every knob of teacher-student distillation, validated when it is built.

One object carries the loss, the kd_ratio schedule, the teacher and the hidden-state options, so a
bad configuration fails at construction (``DistillationModule.__init__``), before any model loads.
YAML gives it as a mapping under ``model.init_args.distill``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from .losses import LOSSES, check_loss_args

SCHEDULES = ("constant", "linear", "cosine")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_QUANTIZATIONS = ("none", "nf4", "nf4-dq")
HIDDEN_LOSSES = ("none", "mse", "cosine")


def _err(arg: str, value, allowed: str, hint: str = "") -> ValueError:
    return ValueError(f"DistillConfig({arg}={value!r}): {allowed}." + (f" Hint: {hint}" if hint else ""))


@dataclass
class DistillConfig:
    """Configuration of distillation; see ``DistillationModule`` for the lifecycle.

    The training loss is ``(1 - kd_ratio) * CE + kd_ratio * KD (+ hidden_weight * hidden loss)``.
    """

    teacher: Optional[str] = field(default=None, metadata={
        "help": "'self' (the student's own base with adapters and fake-quant switched off: QAD/self-distillation "
                "without a second copy of the weights; a student that trains its base weights gets a frozen copy of "
                "the model it started from instead) or a model name/path (frozen, eval, no grad). Required."})
    loss: str = field(default="forward_kl", metadata={"help": f"Divergence, one of {list(LOSSES)}."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T > 0; the loss is scaled by T^2."})
    beta: float = field(default=0.5, metadata={
        "help": "JSD mixture weight in [0, 1] for loss='jsd' (0 = forward KL, 0.5 = JS, 1 = reverse KL)."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew of loss='skew_kl'/'skew_reverse_kl' in [0, 1)."})
    kd_ratio: float = field(default=0.5, metadata={
        "help": "Weight of KD in [0, 1] (1 = pure distillation, 0 = plain CE); the end value of a schedule."})
    kd_ratio_start: Optional[float] = field(default=None, metadata={
        "help": "Start value of a kd_ratio schedule in [0, 1] (None: kd_ratio, i.e. constant)."})
    kd_schedule: str = field(default="constant", metadata={
        "help": f"How kd_ratio moves from kd_ratio_start to kd_ratio: {list(SCHEDULES)}."})
    kd_schedule_steps: Optional[int] = field(default=None, metadata={
        "help": "Optimizer steps the schedule takes (None: the trainer's total steps); kd_ratio afterwards."})
    chunk_size: Optional[int] = field(default=1024, metadata={
        "help": "Tokens per fp32 chunk of the KD loss (None: all at once; more memory, no speed gain on CPU)."})
    vocab_slice: bool = field(default=False, metadata={
        "help": "Allow teacher/student vocab sizes to differ by comparing the common first min(V) logits."})
    teacher_dtype: str = field(default="auto", metadata={
        "help": f"dtype of a named teacher, one of {list(TEACHER_DTYPES)} ('auto': float32)."})
    teacher_device: Optional[str] = field(default=None, metadata={
        "help": "Device of a named teacher, e.g. 'cpu' or 'cuda:1' (None: the student's device)."})
    teacher_quantization: str = field(default="none", metadata={
        "help": f"Quantize a named teacher's linears (not lm_head) to save memory: {list(TEACHER_QUANTIZATIONS)}."})
    teacher_seed: int = field(default=0, metadata={"help": "Seed of a built-in random teacher (tiny-llama)."})
    hidden_loss: str = field(default="none", metadata={
        "help": f"Hidden-state distillation: {list(HIDDEN_LOSSES)}; adds hidden_weight * loss."})
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight >= 0 of the hidden-state loss."})
    hidden_layers: Optional[List[List[int]]] = field(default=None, metadata={
        "help": "Pairs [student_index, teacher_index] into hidden_states (0 = embeddings, L = last layer); "
                "None maps each student layer i to teacher layer round(i * L_t / L_s)."})
    hidden_projection: bool = field(default=True, metadata={
        "help": "Learn a linear map student->teacher width where widths differ (else a width mismatch is an error)."})

    def __post_init__(self):
        if self.teacher is None or (isinstance(self.teacher, str) and not self.teacher.strip()):
            raise _err("teacher", self.teacher, "a teacher is required",
                       "teacher='self' for self-distillation (QAD/QLoRA) or a model name/path such as "
                       "'smollm2-135m' or '/path/to/hf_model'.")
        if not isinstance(self.teacher, str):
            raise _err("teacher", self.teacher, "expected a string: 'self' or a model name/path")
        try:
            check_loss_args(self.loss, self.temperature, self.beta, self.skew_alpha, self.chunk_size,
                            where="DistillConfig")
        except ValueError as e:
            raise ValueError(str(e)) from None
        for arg in ("kd_ratio", "kd_ratio_start"):
            v = getattr(self, arg)
            if v is None and arg == "kd_ratio_start":
                continue
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0):
                raise _err(arg, v, "must be a number in [0, 1]", "0 = cross-entropy only, 1 = KD only.")
        if self.kd_schedule not in SCHEDULES:
            raise _err("kd_schedule", self.kd_schedule, f"allowed: {list(SCHEDULES)}")
        if self.kd_schedule != "constant" and self.kd_ratio_start is None:
            raise _err("kd_ratio_start", None, f"kd_schedule={self.kd_schedule!r} needs a start value",
                       "e.g. kd_ratio_start=0.0, kd_ratio=0.9 ramps KD in.")
        if self.kd_schedule_steps is not None and not (isinstance(self.kd_schedule_steps, int)
                                                       and self.kd_schedule_steps >= 1):
            raise _err("kd_schedule_steps", self.kd_schedule_steps, "must be an int >= 1 or None")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise _err("teacher_dtype", self.teacher_dtype, f"allowed: {list(TEACHER_DTYPES)}")
        if self.teacher_quantization not in TEACHER_QUANTIZATIONS:
            raise _err("teacher_quantization", self.teacher_quantization, f"allowed: {list(TEACHER_QUANTIZATIONS)}")
        if self.teacher == "self":
            for arg, default in (("teacher_quantization", "none"), ("teacher_dtype", "auto"), ("teacher_device", None)):
                if getattr(self, arg) != default:
                    raise _err(arg, getattr(self, arg), "only applies to a named teacher",
                               "teacher='self' runs the student's own weights on its device.")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise _err("hidden_loss", self.hidden_loss, f"allowed: {list(HIDDEN_LOSSES)}")
        if not (isinstance(self.hidden_weight, (int, float)) and math.isfinite(self.hidden_weight)
                and self.hidden_weight >= 0):
            raise _err("hidden_weight", self.hidden_weight, "must be a finite number >= 0")
        if self.hidden_layers is not None:
            ok = isinstance(self.hidden_layers, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)
                for p in self.hidden_layers) and len(self.hidden_layers) > 0
            if not ok:
                raise _err("hidden_layers", self.hidden_layers, "expected a non-empty list of [student, teacher] "
                           "index pairs", "[[2, 4], [4, 8]] maps student layer 2 to teacher 4 and 4 to 8.")
            self.hidden_layers = [list(p) for p in self.hidden_layers]

    @property
    def self_teacher(self) -> bool:
        return self.teacher == "self"

    def kd_ratio_at(self, step: int, total_steps: Optional[int] = None) -> float:
        """kd_ratio at optimizer step ``step`` of the schedule."""
        if self.kd_schedule == "constant" or self.kd_ratio_start is None:
            return float(self.kd_ratio)
        n = self.kd_schedule_steps or total_steps or 1
        x = min(1.0, max(0.0, step / max(1, n)))
        if self.kd_schedule == "cosine":
            x = 0.5 * (1.0 - math.cos(math.pi * x))
        return float(self.kd_ratio_start + (self.kd_ratio - self.kd_ratio_start) * x)

    def to_dict(self) -> dict:
        return asdict(self)
