"""QATCallback with qft's own CausalLMModule: the swap happens inside configure_model, errors come before training."""
import pytest
import pytorch_lightning as pl
import torch

from qft.qat import FakeQuantLinear, FakeQuantLoRALinear, QATCallback
from qft.quant import QuantScheme


def _fit(cb, steps=2, **module_kw):
    from qft.data import QFTDataModule
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", compute_dtype="float32", lr=1e-3, weight_decay=0.1, **module_kw)
    data = QFTDataModule(task="synthetic", tokenizer="tiny-llama", seq_len=48, batch_size=2, num_train=8, num_val=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[cb], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_causal_lm_module_full_finetune_with_learned_scales(tmp_path):
    cb = QATCallback(weight=QuantScheme(bits=4, group_size=64), range_learning=True, lr_multiplier=5.0)
    module, trainer = _fit(cb)
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FakeQuantLinear) and len(cb.swapped) == 28
    groups = [g for g in trainer.optimizers[0].param_groups if any(p is layer.weight_scale for p in g["params"])]
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 0.0  # scales must never decay towards zero
    assert groups[0]["lr"] == pytest.approx(5.0 * trainer.optimizers[0].param_groups[0]["lr"])

    # a fresh CausalLMModule rebuilt from the checkpoint computes the same logits
    from qft.module import CausalLMModule
    from qft.qat import restore

    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    fresh = CausalLMModule(model="tiny-llama", compute_dtype="float32", seed=1)
    restore(fresh, tmp_path / "qat.ckpt")
    ids = torch.randint(0, 1000, (1, 12))
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, module(input_ids=ids).logits)


def test_causal_lm_module_lora_merged():
    cb = QATCallback(weight=QuantScheme(bits=4, group_size=32), lora_merged=True)
    module, _ = _fit(cb, adapter="lora", lora_r=4)
    assert any(isinstance(m, FakeQuantLoRALinear) for m in module.modules())
    assert not any(n.endswith(("lora_A.default", "lora_B.default")) and isinstance(m, FakeQuantLinear)
                   for n, m in module.named_modules())


def test_bad_group_size_fails_before_training_and_names_module():
    cb = QATCallback(weight=QuantScheme(bits=4, group_size=96))
    with pytest.raises(ValueError, match=r"group_size=96.*module 'model\.model\.layers\.0\.self_attn\.q_proj'"):
        _fit(cb)
