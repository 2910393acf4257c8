"""DistillationModule: config validation, teachers (named, NF4, self), vocab checks, and KD's effect."""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qft.distill import DistillationModule, DistillConfig, distill_loss, fake_quant_disabled, self_teacher_mode
from qft.distill.losses import shift_labels

F32 = dict(model="tiny-llama", compute_dtype="float32")


@pytest.mark.parametrize("distill, match", [
    (dict(teacher="self", loss="kl_div"), "loss='kl_div'.*allowed"),
    (dict(teacher="self", kd_ratio=1.5), "kd_ratio=1.5.*\\[0, 1\\]"),
    (dict(teacher="self", kd_ratio=-0.1), "kd_ratio=-0.1"),
    (dict(teacher="self", temperature=0), "temperature=0"),
    (dict(teacher="self", temperature=-2.0), "temperature=-2.0"),
    (dict(teacher=None), "teacher=None.*required"),
    (dict(teacher=""), "teacher=''.*required"),
    (None, "a teacher is required"),
    (dict(teacher="self", kd_schedule="linear"), "kd_ratio_start"),
    (dict(teacher="self", kd_schedule="step"), "kd_schedule='step'"),
    (dict(teacher="self", teacher_quantization="nf4"), "only applies to a named teacher"),
    (dict(teacher="x", teacher_dtype="int8"), "teacher_dtype='int8'"),
    (dict(teacher="x", hidden_layers=[[1]]), "hidden_layers"),
    (dict(tacher="self"), "Fields of DistillConfig"),
])
def test_bad_configs_fail_in_init(distill, match):
    with pytest.raises(ValueError, match=match):
        DistillationModule(distill=distill, **F32)


def test_kd_ratio_schedules():
    c = DistillConfig(teacher="self", kd_ratio=0.5)
    assert c.kd_ratio_at(0) == c.kd_ratio_at(10**6) == 0.5
    lin = DistillConfig(teacher="self", kd_ratio=1.0, kd_ratio_start=0.0, kd_schedule="linear", kd_schedule_steps=10)
    assert [lin.kd_ratio_at(s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    cos = DistillConfig(teacher="self", kd_ratio=0.2, kd_ratio_start=1.0, kd_schedule="cosine")
    assert cos.kd_ratio_at(0, 100) == 1.0 and cos.kd_ratio_at(50, 100) == pytest.approx(0.6)
    assert cos.kd_ratio_at(100, 100) == pytest.approx(0.2)


def test_named_teacher_is_frozen_outside_the_module_and_in_its_own_dtype(token_batches):
    m = DistillationModule(distill=dict(teacher="tiny-llama", teacher_seed=1, teacher_dtype="bfloat16"), **F32)
    m.configure_model()
    t = m.teacher.model
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16}
    own = {id(p) for p in m.parameters()}
    assert not any(id(p) in own for p in t.parameters())  # not saved, not moved, not in the optimizer
    assert not any(k.startswith("teacher") for k in m.state_dict())
    b = token_batches(1)[0]
    loss = m.step_loss(b, "train")
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    # the mixed loss is exactly (1-r) CE + r KD
    with torch.no_grad():
        out = m.model(**b)
        tl = t(input_ids=b["input_ids"]).logits
        kd = distill_loss(out.logits, tl.float(), shift_labels(b["labels"]))
    assert loss.item() == pytest.approx(0.5 * out.loss.item() + 0.5 * kd.item(), rel=1e-4)


def test_nf4_teacher(token_batches):
    bnb = pytest.importorskip("bitsandbytes")
    m = DistillationModule(distill=dict(teacher="tiny-llama", teacher_seed=1, teacher_quantization="nf4"), **F32)
    m.configure_model()
    n4 = [x for x in m.teacher.model.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(n4) == 4 * 7  # every decoder linear, not lm_head
    assert torch.isfinite(m.step_loss(token_batches(1)[0], "train"))


def _save_small_llama(path, vocab, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_vocab_mismatch_is_an_error_unless_vocab_slice(tmp_path, token_batches):
    from qft.models import load_tokenizer

    path = _save_small_llama(tmp_path / "t", vocab=len(load_tokenizer("tiny-llama")) + 64)
    m = DistillationModule(distill=dict(teacher=path), **F32)
    with pytest.raises(ValueError, match="vocab_slice=True"):
        m.configure_model()
    m = DistillationModule(distill=dict(teacher=path, vocab_slice=True, hidden_loss="cosine"), **F32)
    m.configure_model()
    # narrower, shallower teacher: a learned 128 -> 64 projection per mapped layer (uniform map 4 -> 2)
    assert m.hidden_loss.pairs == [[1, 0], [2, 1], [3, 2], [4, 2]]
    assert m.hidden_loss.proj[0].weight.shape == (64, 128)
    assert any(n.startswith("hidden_loss.proj") and p.requires_grad for n, p in m.named_parameters())
    loss = m.step_loss(token_batches(1)[0], "train")
    loss.backward()
    assert m.hidden_loss.proj[0].weight.grad.abs().sum() > 0


class _FQ(nn.Linear):
    """A toy layer following the fake-quant protocol: rounds its weight while enabled."""

    def __init__(self):
        super().__init__(4, 4)
        self.fake_quant_enabled = True

    def forward(self, x):
        w = torch.round(self.weight * 2) / 2 if self.fake_quant_enabled else self.weight
        return nn.functional.linear(x, w, self.bias)


def test_self_teacher_mode_switches_off_fake_quant_and_restores_state():
    net = nn.Sequential(_FQ(), nn.Dropout(0.5), _FQ())
    net.train()
    net[1].eval()  # a module deliberately in eval stays so
    net[2].fake_quant_enabled = False  # a per-module flag is restored as it was
    x = torch.randn(3, 4)
    with self_teacher_mode(net):
        assert not net[0].fake_quant_enabled and not net[0].training
        assert not torch.is_grad_enabled()
        y = net(x)
    assert net[0].fake_quant_enabled and not net[2].fake_quant_enabled
    assert net[0].training and not net[1].training
    with fake_quant_disabled(net):
        ref = net[2](net[1](net[0](x)))  # dropout is in eval: identity
    torch.testing.assert_close(y, ref)


def test_self_teacher_with_lora_is_the_base_model(token_batches):
    m = DistillationModule(adapter="lora", distill=dict(teacher="self"), **F32)
    m.configure_model()
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter change the output
    b = token_batches(1)[0]
    tl, _ = m.teacher.forward(m, b)
    with torch.no_grad(), m.model.disable_adapter():
        base = m.model(input_ids=b["input_ids"]).logits
        adapted_off = m.model(input_ids=b["input_ids"]).logits
    with torch.no_grad():
        adapted = m.model(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(tl, base)
    torch.testing.assert_close(base, adapted_off)
    assert (adapted - base).abs().max() > 1e-3


def test_self_teacher_without_anything_to_switch_off_is_an_error(token_batches):
    m = DistillationModule(distill=dict(teacher="self"), **F32)
    m.configure_model()
    with pytest.raises(ValueError, match="neither peft adapters nor fake-quant"):
        m.step_loss(token_batches(1)[0], "train")


def _held_out_kl(student, teacher, batches):
    student.eval()
    tot = 0.0
    with torch.no_grad():
        for b in batches:
            s = student(input_ids=b["input_ids"]).logits
            t = teacher(input_ids=b["input_ids"]).logits
            tot += distill_loss(s, t, shift_labels(b["labels"])).item()
    return tot / len(batches)


def _fit(kd_ratio, train):
    pl.seed_everything(0, workers=False)
    m = DistillationModule(distill=dict(teacher="tiny-llama", teacher_seed=1, kd_ratio=kd_ratio, chunk_size=32),
                           lr=3e-3, **F32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(train), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(train, batch_size=None))
    return m


def test_kd_lowers_held_out_kl_to_teacher_more_than_ce_at_equal_steps(token_batches):
    train, held_out = token_batches(4, seq=16, seed=0), token_batches(2, seq=16, seed=1)
    ce_only, kd = _fit(0.0, train), _fit(0.9, train)
    teacher = kd.teacher.model
    from qft.models import load_model

    before = _held_out_kl(load_model("tiny-llama", seed=0), teacher, held_out)
    kl_ce, kl_kd = _held_out_kl(ce_only.model, teacher, held_out), _held_out_kl(kd.model, teacher, held_out)
    print(f"held-out KL to teacher: init {before:.4f}, CE-only {kl_ce:.4f}, KD {kl_kd:.4f}")
    assert kl_kd < kl_ce, (before, kl_ce, kl_kd)
    assert kl_kd < before
