"""``DistillationModule``: ``CausalLMModule`` whose loss mixes cross-entropy with a teacher's KD signal."""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Union

import torch

from ..module import CausalLMModule
from .config import DistillConfig
from .hidden import HiddenStateLoss
from .losses import kd_ce_loss, shift_labels
from .teacher import Teacher


def _as_config(distill) -> DistillConfig:
    if isinstance(distill, DistillConfig):
        return distill
    if isinstance(distill, dict):
        try:
            return DistillConfig(**distill)
        except TypeError as e:
            raise ValueError(f"DistillationModule(distill={distill!r}): {e}. Fields of DistillConfig: "
                             f"{sorted(DistillConfig.__dataclass_fields__)}.") from None
    if distill is None:
        raise ValueError("DistillationModule(distill=None): a teacher is required. Hint: "
                         "distill=DistillConfig(teacher='self') for self-distillation (QAD/QLoRA) or "
                         "DistillConfig(teacher='smollm2-135m') for a named teacher; in YAML set "
                         "model.init_args.distill.teacher.")
    raise TypeError(f"DistillationModule(distill={distill!r}): expected a DistillConfig or a dict of its fields, "
                    f"got {type(distill).__name__}.")


class DistillationModule(CausalLMModule):
    """Train a student with ``(1 - kd_ratio) * CE + kd_ratio * KD`` (+ ``hidden_weight * hidden loss``).

    Takes every ``CausalLMModule`` argument plus ``distill`` (a ``DistillConfig`` or a dict of its fields).

    Lifecycle:
        - ``__init__``: validates ``distill`` (unknown loss, kd_ratio outside [0, 1], temperature <= 0,
          a missing teacher all fail here) and the student arguments; loads nothing.
        - ``on_fit_start``: a ``self`` teacher needs adapters or fake-quant layers in the student (else
          it is the student itself); checked here, after every callback changed the model. A student
          that trains its own base weights (full fine-tune QAT) gets a frozen fp32 copy of its source
          model (``model``) as teacher here, since its live weights would drift with it.
        - ``configure_model``: builds the student (and runs QAT/PRILoRA hooks) via ``CausalLMModule``,
          then loads a named teacher (frozen, eval, own dtype/device, optionally NF4), checks that the
          vocab sizes agree (or ``vocab_slice``), and builds the hidden-state projections, if any.
        - ``training_step``/``validation_step`` -> ``step_loss``: a teacher pass under ``no_grad``
          (for ``teacher='self'`` the student's model with adapters and fake-quant switched off), the
          student pass, then the chunked fp32 KD loss. Training returns the mixed loss with
          ``kd_ratio`` taken from the schedule at the current global step; validation returns plain CE,
          so ``val/ppl`` stays a perplexity, and logs ``val/kd`` beside it.
        - Checkpoints: the teacher is not part of the module tree, so it is never saved; hidden-state
          projections are trainable and are saved with the adapters.
    """

    def __init__(self, distill: Union[DistillConfig, dict, None] = None, **kwargs):
        super().__init__(**kwargs)
        self.distill_cfg = _as_config(distill)
        self.hparams["distill"] = asdict(self.distill_cfg)
        self.teacher = Teacher(self.distill_cfg)
        self.hidden_loss: Optional[HiddenStateLoss] = None

    def configure_model(self) -> None:
        if self.model_ready:
            return
        super().configure_model()
        cfg = self.distill_cfg
        self.teacher.build(self)
        if cfg.hidden_loss != "none" and self.hidden_loss is None:
            sl, sd = int(self.model.config.num_hidden_layers), int(self.model.config.hidden_size)
            tl, td = self.teacher.num_layers_and_width(self.model)
            self.hidden_loss = HiddenStateLoss(sl, tl, sd, td, loss=cfg.hidden_loss, layer_map=cfg.hidden_layers,
                                               projection=cfg.hidden_projection)

    def on_fit_start(self) -> None:
        """Refuse a self-teacher that would be the student itself before the first step, not at it."""
        if self.teacher.is_self:
            self.teacher.check_self(self)

    def kd_ratio_now(self) -> float:
        cfg, total = self.distill_cfg, None
        if cfg.kd_schedule != "constant" and cfg.kd_schedule_steps is None and self._trainer is not None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:  # no dataloader yet
                total = None
        return cfg.kd_ratio_at(self.global_step, total)

    def step_loss(self, batch: dict, stage: str) -> torch.Tensor:
        cfg = self.distill_cfg
        want_hidden = self.hidden_loss is not None
        labels = batch["labels"]
        t_logits, t_hidden = self.teacher.forward(self, batch, hidden=want_hidden)
        # No labels to the model: CE is computed with KD in one chunked fp32 pass (kd_ce_loss), so the
        # logits are never upcast whole (Hugging Face's CE would copy them to fp32).
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         output_hidden_states=want_hidden)
        r = self.kd_ratio_now() if stage == "train" else 0.0
        loss, ce, kd = kd_ce_loss(out.logits, t_logits, shift_labels(labels), r, loss=cfg.loss,
                                  temperature=cfg.temperature, beta=cfg.beta, skew_alpha=cfg.skew_alpha,
                                  chunk_size=cfg.chunk_size, vocab_slice=cfg.vocab_slice)
        bs = batch["input_ids"].shape[0]
        self._log(f"{stage}/ce", ce, bs)
        self._log(f"{stage}/kd", kd, bs)
        if want_hidden:
            hid = self.hidden_loss(out.hidden_states, t_hidden, batch.get("attention_mask"))
            self._log(f"{stage}/hidden", hid, bs)
            if stage == "train":
                loss = loss + cfg.hidden_weight * hid
        if stage != "train":
            return ce  # validation/test: plain CE, so {stage}/ppl stays a perplexity
        self._log("train/kd_ratio", torch.tensor(r), bs)
        return loss

    def _log(self, name: str, value: torch.Tensor, bs: int) -> None:
        if self._trainer is not None:
            self.log(name, value.detach().float(), batch_size=bs, sync_dist=not name.startswith("train/"))
