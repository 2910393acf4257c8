"""Teacher-student distillation: chunked fp32 divergences, hidden-state matching, a frozen or
self teacher, and ``DistillationModule`` (QAD when combined with ``qft.qat.QATCallback``)."""
from .config import DistillConfig
from .hidden import HiddenStateLoss, uniform_layer_map
from .losses import LOSSES, distill_loss, divergence_rows, kd_ce_loss, shift_labels
from .module import DistillationModule
from .teacher import FAKE_QUANT_FLAG, Teacher, fake_quant_disabled, self_teacher_mode

__all__ = ["DistillConfig", "DistillationModule", "HiddenStateLoss", "LOSSES", "Teacher", "FAKE_QUANT_FLAG",
           "distill_loss", "divergence_rows", "kd_ce_loss", "fake_quant_disabled", "self_teacher_mode", "shift_labels",
           "uniform_layer_map"]
