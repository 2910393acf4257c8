"""QAD: a QAT student (qft.qat.QATCallback) distilled from its own fp weights (teacher='self')."""
import pytest
import pytorch_lightning as pl
import torch

from qft.distill import DistillationModule
from qft.layers import fake_quant_disabled
from qft.layers import fake_quant_switches as fake_quant_modules

qat = pytest.importorskip("qft.qat")
from qft.quant import QuantScheme  # noqa: E402

F32 = dict(model="tiny-llama", compute_dtype="float32")


def _prepared(module, **qat_kwargs):
    cb = qat.QATCallback(weight=QuantScheme(bits=4, group_size=64), **qat_kwargs)
    cb.setup(None, module, "fit")  # queues the swap; it runs inside configure_model
    module.configure_model()
    return cb


def test_self_teacher_of_a_qat_student_is_the_fp_model(token_batches):
    from qft.models import load_model

    m = DistillationModule(distill=dict(teacher="self"), **F32)
    _prepared(m)
    assert len(fake_quant_modules(m.model)) == 4 * 7
    b = token_batches(1)[0]
    t_logits, _ = m.teacher.forward(m, b)
    with torch.no_grad():
        fp = load_model("tiny-llama", seed=0)(input_ids=b["input_ids"]).logits
        student = m.model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(t_logits, fp)
    assert (student - fp).abs().max() > 1e-3  # the student really is fake-quantized
    assert all(bool(x.qat_enabled) for x in fake_quant_modules(m.model))  # switched back on


def test_self_teacher_with_merged_lora_qat_is_the_fp_base(token_batches):
    from qft.models import load_model

    m = DistillationModule(adapter="lora", distill=dict(teacher="self"), **F32)
    _prepared(m, lora_merged=True)
    assert any(type(x).__name__ == "FakeQuantLoRALinear" for x in m.model.modules())
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    b = token_batches(1)[0]
    t_logits, _ = m.teacher.forward(m, b)
    with torch.no_grad():
        fp = load_model("tiny-llama", seed=0)(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(t_logits, fp)
    assert all(x.active_adapters for x in m.model.modules() if type(x).__name__ == "FakeQuantLoRALinear")


def test_qad_trains_with_the_callback(token_batches):
    pl.seed_everything(0)
    m = DistillationModule(distill=dict(teacher="self", kd_ratio=1.0), lr=1e-3, **F32)
    cb = qat.QATCallback(weight=QuantScheme(bits=4, group_size=64))
    train = token_batches(3, seq=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(train, batch_size=None))
    assert cb.swapped and trainer.global_step == 3
    kd_first = trainer.callback_metrics["train/kd"]
    assert torch.isfinite(kd_first) and kd_first > 0


def test_full_finetune_self_teacher_stays_the_starting_model(token_batches):
    """A student training its own weights would drift as its own teacher (KD-only QAT collapsed to ppl
    18,783 in 200 steps): the teacher is a frozen copy of the model it started from, however far it trains."""
    from qft.models import load_model

    pl.seed_everything(0)
    m = DistillationModule(distill=dict(teacher="self", kd_ratio=1.0), lr=1e-2, seed=3, **F32)
    cb = qat.QATCallback(weight=QuantScheme(bits=4, group_size=64))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(token_batches(3, seq=16), batch_size=None))
    assert m.teacher.model is not None and not any(p.requires_grad for p in m.teacher.model.parameters())
    b = token_batches(1)[0]
    start = load_model("tiny-llama", seed=3)  # the student's own seed, not the teacher_seed
    with torch.no_grad():
        expected = start(input_ids=b["input_ids"]).logits
        with fake_quant_disabled(m.model):
            drifted = m.model(input_ids=b["input_ids"]).logits
    t_logits, _ = m.teacher.forward(m, b)
    torch.testing.assert_close(t_logits, expected)
    assert (drifted - expected).abs().max() > 1e-3  # the student's own fp weights did move


def test_self_teacher_without_a_source_is_refused_for_a_full_finetune():
    from types import SimpleNamespace

    from qft.distill.config import DistillConfig
    from qft.distill.teacher import Teacher

    m = DistillationModule(distill=dict(teacher="self"), **F32)
    _prepared(m)
    with pytest.raises(ValueError, match="trains its own base weights.*name the teacher"):
        Teacher(DistillConfig(teacher="self")).check_self(SimpleNamespace(model=m.model, hparams=SimpleNamespace()))
