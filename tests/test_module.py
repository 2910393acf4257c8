import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from qft.data.synthetic import addition_splits
from qft.data.tokenize import chat_example, collate
from qft.module import CausalLMModule, causal_lm_loss


@pytest.mark.parametrize("kw, match", [
    (dict(quantization="int3"), "quantization='int3'"),
    (dict(adapter="dora"), "adapter='dora'"),
    (dict(quantization="nf4"), "adapter='none'"),
    (dict(adapter="lora", lora_r=0), "lora_r=0"),
    (dict(lr=0), "lr=0"),
    (dict(compute_dtype="fp8"), "compute_dtype='fp8'"),
    (dict(attention="flash"), "attention='flash'"),
])
def test_bad_arguments_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(model="tiny-llama", **kw)


def _batches(tokenizer, n_batches, bs=4, seed=0):
    train, _ = addition_splits(n_batches * bs, 1, seed)
    data = [chat_example(tokenizer, r["messages"]) for r in train]
    return [collate(data[i:i + bs], tokenizer.pad_token_id) for i in range(0, len(data), bs)]


def test_selective_logits_loss_equals_hf_loss(tokenizer):
    module = CausalLMModule(model="tiny-llama")
    module.configure_model()
    batch = _batches(tokenizer, 1)[0]
    batch["labels"][0, -6:] = -100  # ragged labels
    torch.testing.assert_close(causal_lm_loss(module.model, batch), module.model(**batch).loss)


def test_nf4_lora_uses_4bit_aware_peft_layers_and_merges_correctly(tokenizer):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", lora_r=4, compute_dtype="float32")
    module.configure_model()
    model = module.model
    lora = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora) == 4 * 7  # q,k,v,o,gate,up,down in each of 4 layers
    assert isinstance(model.get_base_model().lm_head, torch.nn.Linear)
    assert not any(isinstance(m, bnb.nn.Linear4bit) and m.weight.requires_grad for m in model.modules())
    for m in lora:  # give the adapters a real delta
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.01, generator=torch.Generator().manual_seed(0))
    layer = lora[0]
    base = layer.get_base_layer()
    expected = dequantize_4bit(base.weight.data, base.weight.quant_state) + layer.get_delta_weight("default")
    x = _batches(tokenizer, 1)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # a no-grad eval forward: where bitsandbytes would repack the weight on CPU
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        model.merge_and_unload()
    merged = dequantize_4bit(base.weight.data, base.weight.quant_state)
    # merging re-quantises W + BA to NF4 (~5% error); a merge into packed bytes is ~100% off
    assert (merged - expected).norm() < 0.1 * expected.norm()


def _fit(module, batches, max_steps, tmp_path, ckpt_path=None, callbacks=(), max_epochs=None):
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = pl.Trainer(max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, callbacks=[Record(), *callbacks], limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer, losses


def test_qlora_checkpoint_is_adapter_only_and_resume_is_exact(tokenizer, tmp_path):
    # Lightning replays a batch when resuming mid-epoch from a plain DataLoader, so the interruption
    # falls on an epoch boundary (3 batches), and the LR is constant so both runs share a schedule.
    batches = _batches(tokenizer, 3)

    def make():
        return CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", lora_r=4, lr=1e-2,
                              min_lr_ratio=1.0, compute_dtype="float32", save_adapter=False)

    pl.seed_everything(0)
    _, full = _fit(make(), batches, -1, tmp_path, max_epochs=2)

    pl.seed_everything(0)
    trainer, first = _fit(make(), batches, -1, tmp_path, max_epochs=1)  # ends with epoch 0 complete
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    assert sd and all("lora_" in k for k in sd), [k for k in sd if "lora_" not in k][:5]
    assert ckpt.stat().st_size < 2_000_000  # the 4-bit base (and the 6M-param tied embedding) stay out

    pl.seed_everything(1)  # a different RNG state: everything that matters must come from the checkpoint
    _, resumed = _fit(make(), batches, -1, tmp_path, ckpt_path=str(ckpt), max_epochs=2)
    assert len(full) == 6 and first == full[:3] and len(resumed) == 3
    assert resumed == pytest.approx(full[3:], abs=1e-6)
    assert full[-1] < full[0]


def test_adapter_saved_in_peft_format(tokenizer, tmp_path):
    from peft import PeftModel

    from qft.models import load_model

    module = CausalLMModule(model="tiny-llama", quantization="nf4-dq", adapter="lora", lora_r=4, lr=1e-2)
    trainer, _ = _fit(module, _batches(tokenizer, 2), 2, tmp_path)
    adir = module.adapter_dir
    assert adir and (tmp_path / "adapter").exists()
    loaded = PeftModel.from_pretrained(load_model("tiny-llama"), adir)
    got = {k: v for k, v in loaded.state_dict().items() if "lora_B" in k}
    want = {k: v for k, v in module.model.state_dict().items() if "lora_B" in k}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(v.abs().sum() > 0 for v in got.values())  # trained, not the zero init
    module2 = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", lora_r=4)
    _fit(module2, _batches(tokenizer, 1), 1, tmp_path)
    assert module2.adapter_dir.endswith("adapter-1")  # never overwrites the first


def test_adapter_of_a_qat_trained_model_is_saved_whole(tokenizer, tmp_path):
    # QAT swaps peft's LoRA layers for FakeQuantLoRALinear; peft's own save found no adapter weights then
    from peft import PeftModel

    from qft.models import load_model
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    module = CausalLMModule(model="tiny-llama", adapter="lora", lora_r=4, lr=1e-2, compute_dtype="float32")
    qat = QATCallback(weight=QuantScheme(bits=4, group_size=64, symmetric=True))
    _fit(module, _batches(tokenizer, 2), 2, tmp_path, callbacks=[qat])
    assert any(type(m).__name__ == "FakeQuantLoRALinear" for m in module.model.modules())
    loaded = PeftModel.from_pretrained(load_model("tiny-llama"), module.adapter_dir)
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    want = {k: v for k, v in module.model.state_dict().items() if "lora_" in k}
    assert len(got) == 2 * 28 and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    batch = _batches(tokenizer, 1)[0]
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)  # peft draws LoRA A from the global RNG
        module = CausalLMModule(model="tiny-llama", adapter="lora", lora_r=4, gradient_checkpointing=gc)
        module.configure_model()
        module.train()
        for m in module.model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05, generator=torch.Generator().manual_seed(1))
        causal_lm_loss(module.model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])


def test_full_finetune_learns(tokenizer, tmp_path):
    module = CausalLMModule(model="tiny-llama", lr=3e-3, compute_dtype="float32")
    _, losses = _fit(module, _batches(tokenizer, 2) * 4, 8, tmp_path)
    assert losses[-1] < 0.8 * losses[0]


def test_qat_checkpoint_loads_into_a_fresh_module_without_the_callback(tokenizer, tmp_path):
    from qft.qat import QATCallback, fake_quant_modules
    from qft.quant import QuantScheme

    module = CausalLMModule(model="tiny-llama", lr=1e-3, compute_dtype="float32")
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    qat = QATCallback(weight=QuantScheme(bits=4, group_size=64), range_learning=True)
    _fit(module, _batches(tokenizer, 2), 2, tmp_path, callbacks=[qat, ckpt_cb])
    fresh = CausalLMModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt")
    trained = dict(fake_quant_modules(module))
    loaded = dict(fake_quant_modules(fresh))
    assert loaded.keys() == trained.keys() and len(loaded) == 4 * 7
    sd_t, sd_l = module.state_dict(), fresh.state_dict()
    scale_keys = [k for k in sd_t if "scale" in k]
    assert scale_keys and all(torch.equal(sd_t[k], sd_l[k]) for k in scale_keys)


def test_eager_attention_computes_what_sdpa_does(tokenizer):
    """``attention="eager"`` (faster on the CPU for short chats) changes the kernels, not the model."""
    x = _batches(tokenizer, 1)[0]
    out = {}
    for impl in ("sdpa", "eager"):
        m = CausalLMModule(model="tiny-llama", attention=impl)
        m.configure_model()
        with torch.no_grad():
            out[impl] = m.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    keep = x["attention_mask"].bool()
    assert torch.allclose(out["sdpa"][keep], out["eager"][keep], atol=1e-4)
