"""The teacher: a frozen model of its own, or the student's own base with adapters and fake-quant off.

Why the teacher lives outside the LightningModule's module tree: a named teacher is frozen and may
sit on another device in another dtype (or in NF4). Registered as a submodule, Lightning would move
it to the student's device, DDP would wrap it, and checkpoints would carry it. ``Teacher`` is a plain
object, so none of that happens; it is rebuilt from the config in ``configure_model``.

Self-teacher (``teacher="self"``)
--------------------------------
The teacher pass runs the student's own model with every LoRA adapter off and fake quantization off,
through ``qft.layers.adapters_disabled`` and ``qft.layers.fake_quant_disabled`` (the layer protocol
every qft layer kind answers: peft LoRA, QAT's merged-LoRA layers, fake-quant switches), in eval mode
(each module's own training flag is restored afterwards), under ``no_grad``. With a QAT student on
adapters this is quantization-aware distillation from the fp model; with an NF4 QLoRA student the
teacher is the NF4 base. No second copy of the weights exists.

A student that trains its own base weights (full fine-tune QAT: ``qft.layers.base_trainable``) cannot
be its own teacher: its fp weights move with every step, so the teacher would drift with the student
and KD would anchor nothing. Measured: KD-only QAT of SmolLM2-135M from its live weights collapsed to
held-out perplexity 18,783 after 200 steps (BENCHMARKS.md, "Distillation"). Such a student gets a frozen
fp32 copy of the model it started from instead, loaded again from its source (``hparams.model``), so a
resumed run gets the very same teacher.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from qft.layers import (
    FAKE_QUANT_FLAG,
    QAT_BUFFER,
    adapter_holders,
    adapters_disabled,
    base_trainable,
    fake_quant_disabled,
    fake_quant_switches,
    linear_layers,
)

DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    with adapters_disabled(model), fake_quant_disabled(model), eval_mode(model), torch.no_grad():
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
        self.model = self._load(self.cfg.teacher, self.cfg.teacher_seed)
        self.check_vocab(student_module.model)

    def _load(self, name: str, seed: int) -> nn.Module:
        """A frozen teacher in eval mode, in the configured dtype (optionally NF4)."""
        from .. import models
        from ..qlora import quantize_nf4

        cfg = self.cfg
        dtype = DTYPES[cfg.teacher_dtype]
        model = models.load_model(name, dtype=torch.float32 if cfg.teacher_quantization != "none" else dtype,
                                  seed=seed)
        if cfg.teacher_quantization != "none":
            quantize_nf4(model, double_quant=cfg.teacher_quantization == "nf4-dq", compute_dtype=dtype)
        model.eval()
        model.requires_grad_(False)
        return model

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

    def check_self(self, student_module) -> None:
        """Refuse a self-teacher that would be the student itself; give a student that trains its own base
        weights a frozen copy of the model it started from (``hparams.model``, same seed) as teacher (see
        the module docstring)."""
        if self._checked_self:
            return
        model = student_module.model
        hp = getattr(student_module, "hparams", None)
        source = getattr(hp, "model", None)
        if not adapter_holders(model) and not fake_quant_switches(model):
            raise ValueError("DistillConfig(teacher='self'): the student has neither peft adapters nor fake-quant "
                             f"layers (a bool `{FAKE_QUANT_FLAG}` or a `{QAT_BUFFER}` buffer), so its 'fp teacher' "
                             "would be the student itself and KD would teach nothing. Hint: use adapter='lora', add "
                             "qft.qat.QATCallback, or name a teacher model.")
        moving = [n for n, m in linear_layers(model).items() if base_trainable(m)]
        if moving and self.model is None:
            if source is None:
                raise ValueError(f"DistillConfig(teacher='self'): the student trains its own base weights "
                                 f"({len(moving)} layers, e.g. {moving[0]!r}), so as its own teacher it would drift "
                                 "with every step, and qft does not know which model it started from. Hint: name the "
                                 "teacher, e.g. teacher='smollm2-135m', or freeze the base and train adapters.")
            self.model = self._load(source, int(getattr(hp, "seed", 0) or 0))
        self._checked_self = True

    def forward(self, student_module, batch: dict, hidden: bool = False):
        """Teacher logits (and hidden states if ``hidden``) for ``batch``, on the student's device."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.is_self:
            self.check_self(student_module)
        if self.is_self and self.model is None:
            model = student_module.model
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
