"""The teacher: a frozen model of its own, or the student's own base with adapters and fake-quant off.

Why the teacher lives outside the LightningModule's module tree: a named teacher is frozen and may
sit on another device in another dtype (or in NF4). Registered as a submodule, Lightning would move
it to the student's device, DDP would wrap it, and checkpoints would carry it. ``Teacher`` is a plain
object, so none of that happens; it is rebuilt from the config in ``configure_model``.

Self-teacher protocol (``teacher="self"``)
------------------------------------------
The teacher pass runs the student's own model with

- every peft adapter disabled (``PeftModel.disable_adapter()``), and
- fake quantization off. The protocol a fake-quant layer follows is either of
  (a) a bool attribute ``fake_quant_enabled``, or (b) a one-element bool tensor ``qat_enabled``
  (what ``qft.qat.FakeQuantLinear``/``FakeQuantLoRALinear`` hold as a buffer). Both are set to
  off for the pass and restored afterwards, module by module;
- adapters that live inside a fake-quant layer (``qft.qat.FakeQuantLoRALinear``, QAT with
  ``lora_merged=True``, which is no longer a peft tuner layer that ``disable_adapter`` reaches):
  a module holding ``lora_A`` and a list ``active_adapters`` gets an empty list for the pass.

and in eval mode (each module's own training flag is restored afterwards), under ``no_grad``.
With a QAT student this is quantization-aware distillation from the fp model; with an NF4 QLoRA
student the teacher is the NF4 base. No second copy of the weights exists.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

FAKE_QUANT_FLAG = "fake_quant_enabled"
QAT_BUFFER = "qat_enabled"
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _flag(m: nn.Module):
    """The fake-quant switch of ``m`` per the protocol above, or None."""
    v = getattr(m, FAKE_QUANT_FLAG, None)
    if isinstance(v, bool):
        return v
    v = getattr(m, QAT_BUFFER, None)
    if torch.is_tensor(v) and v.dtype == torch.bool and v.numel() == 1:
        return bool(v)
    return None


def _set_flag(m: nn.Module, on: bool) -> None:
    if isinstance(getattr(m, FAKE_QUANT_FLAG, None), bool):
        setattr(m, FAKE_QUANT_FLAG, on)
    else:
        getattr(m, QAT_BUFFER).fill_(on)


def fake_quant_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that follow the fake-quant protocol (see the module docstring)."""
    return [m for m in model.modules() if _flag(m) is not None]


def _tuner_layer_cls():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return ()
    return BaseTunerLayer


def has_adapters(model: nn.Module) -> bool:
    """A peft model that still holds peft tuner layers (QAT's merged-LoRA swap may have replaced all)."""
    if not (hasattr(model, "disable_adapter") and getattr(model, "peft_config", None)):
        return False
    cls = _tuner_layer_cls()
    return bool(cls) and any(isinstance(m, cls) for m in model.modules())


def _inner_adapter_modules(model: nn.Module) -> list[nn.Module]:
    """Non-peft modules that compute LoRA themselves (QAT's merged LoRA layers)."""
    cls = _tuner_layer_cls()
    return [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "active_adapters", None), list)
            and not (cls and isinstance(m, cls))]


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module):
    """Switch fake quantization off in ``model`` for the duration; restores each module's own flag."""
    mods = fake_quant_modules(model)
    saved = [_flag(m) for m in mods]
    try:
        for m in mods:
            _set_flag(m, False)
        yield len(mods)
    finally:
        for m, v in zip(mods, saved):
            _set_flag(m, v)


@contextlib.contextmanager
def inner_adapters_disabled(model: nn.Module):
    """Empty ``active_adapters`` of QAT's merged-LoRA layers for the duration (peft cannot reach them)."""
    mods = _inner_adapter_modules(model)
    saved = [m.active_adapters for m in mods]
    try:
        for m in mods:
            m.active_adapters = []
        yield len(mods)
    finally:
        for m, v in zip(mods, saved):
            m.active_adapters = v


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the duration, then each module's own training flag back."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def self_teacher_mode(model: nn.Module):
    """The student's model as its own fp teacher: adapters off, fake-quant off, eval, no grad."""
    adapters = model.disable_adapter() if has_adapters(model) else contextlib.nullcontext()
    with adapters, inner_adapters_disabled(model), fake_quant_disabled(model), eval_mode(model), torch.no_grad():
        yield


class Teacher:
    """Builds and runs the teacher described by a ``DistillConfig``.

    ``build(student_module)`` is called from ``DistillationModule.configure_model``; ``forward`` runs
    one teacher pass and returns ``(logits, hidden_states or None)`` on the student's device.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.model: Optional[nn.Module] = None  # None for the self-teacher
        self._checked_self = False

    @property
    def is_self(self) -> bool:
        return self.cfg.teacher == "self"

    def build(self, student_module) -> None:
        if self.is_self or self.model is not None:
            return
        from .. import models
        from ..qlora import quantize_nf4

        cfg = self.cfg
        dtype = DTYPES[cfg.teacher_dtype]
        model = models.load_model(cfg.teacher, dtype=torch.float32 if cfg.teacher_quantization != "none" else dtype,
                                  seed=cfg.teacher_seed)
        if cfg.teacher_quantization != "none":
            quantize_nf4(model, double_quant=cfg.teacher_quantization == "nf4-dq", compute_dtype=dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.check_vocab(student_module.model)

    def check_vocab(self, student: nn.Module) -> None:
        """A teacher/student vocab size mismatch is an error unless ``vocab_slice=True``."""
        if self.model is None:
            return
        vs = student.get_output_embeddings().weight.shape[0]
        vt = self.model.get_output_embeddings().weight.shape[0]
        if vs != vt and not self.cfg.vocab_slice:
            raise ValueError(f"DistillConfig(teacher={self.cfg.teacher!r}): the teacher's vocabulary has {vt} entries "
                             f"but the student's has {vs}. KD compares distributions token id by token id, so both "
                             "must share a tokenizer. Hint: if they do and only the embedding padding differs, set "
                             "vocab_slice=True to compare the first min(V) logits.")

    def _device(self, student_device: torch.device) -> torch.device:
        return torch.device(self.cfg.teacher_device) if self.cfg.teacher_device else student_device

    def _check_self(self, model: nn.Module) -> None:
        if self._checked_self:
            return
        if not has_adapters(model) and not fake_quant_modules(model) and not _inner_adapter_modules(model):
            raise ValueError("DistillConfig(teacher='self'): the student has neither peft adapters nor fake-quant "
                             f"layers (a bool `{FAKE_QUANT_FLAG}` or a `{QAT_BUFFER}` buffer), so its 'fp teacher' "
                             "would be the student itself and KD would teach nothing. Hint: use adapter='lora', add "
                             "qft.qat.QATCallback, or name a teacher model.")
        self._checked_self = True

    def forward(self, student_module, batch: dict, hidden: bool = False):
        """Teacher logits (and hidden states if ``hidden``) for ``batch``, on the student's device."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.is_self:
            model = student_module.model
            self._check_self(model)
            with self_teacher_mode(model):
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
            return out.logits.detach(), (out.hidden_states if hidden else None)
        if self.model is None:
            self.build(student_module)
        dev = self._device(ids.device)
        if next(self.model.parameters()).device != dev:
            self.model.to(dev)
        # The teacher runs in its own dtype: the student's autocast region must not change it.
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            out = self.model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev),
                             output_hidden_states=hidden)
        logits = out.logits.to(ids.device)
        hs = tuple(h.to(ids.device) for h in out.hidden_states) if hidden else None
        return logits, hs

    def num_layers_and_width(self, student_model: nn.Module) -> tuple[int, int]:
        m = student_model if self.is_self else self.model
        cfg = m.config
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
