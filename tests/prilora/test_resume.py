"""Stopping mid-schedule and resuming gives the same masks, EMAs and adapters as an uninterrupted run."""
import pytorch_lightning as pl
import torch
from prilora_helpers import token_loader, trainer_kwargs

from qft.prilora import PRILoRACallback


def _run(tmp_path, epochs, ckpt_path=None):
    from qft.module import CausalLMModule

    pl.seed_everything(0)  # peft initialises lora_A from the global RNG
    # min_lr_ratio=1: a constant LR, since the cosine horizon (estimated_stepping_batches) of a 1-epoch run
    # differs from the 2-epoch run it is compared with.
    module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32", lr=1e-2,
                            min_lr_ratio=1.0)
    cb = PRILoRACallback(start_step=2, end_step=10, interval=2, final_sparsity=0.5, plot=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], **trainer_kwargs(tmp_path, enable_checkpointing=False))
    trainer.fit(module, token_loader(6), ckpt_path=ckpt_path)  # 6 steps per epoch
    adapters = {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}
    return cb, adapters, trainer


def test_resume_mid_schedule_matches_uninterrupted_run(tmp_path):
    full_cb, full_w, _ = _run(tmp_path / "full", 2)

    _, _, half = _run(tmp_path / "half", 1)  # stops at step 6, between pruning steps 6 and 8
    mid = tmp_path / "half.ckpt"
    half.save_checkpoint(mid)
    state = torch.load(mid, weights_only=False)
    (saved,) = [v for k, v in state["callbacks"].items() if "PRILoRACallback" in k]
    assert saved["last_pruned_step"] == 6 and 0 < saved["target_sparsity"] < 0.5  # mid-schedule
    assert not any("base_layer.weight" in k for k in state["state_dict"])  # adapter-only checkpoint

    res_cb, res_w, trainer = _run(tmp_path / "resumed", 2, ckpt_path=str(mid))
    assert trainer.global_step == 12 and res_cb.last_pruned_step == full_cb.last_pruned_step == 10
    assert set(res_cb.masks) == set(full_cb.masks)
    for name in full_cb.masks:
        assert torch.equal(res_cb.masks[name], full_cb.masks[name]), name
        assert torch.allclose(res_cb.emas[name], full_cb.emas[name], rtol=1e-5, atol=1e-7), name
        assert res_cb.ema_counts[name] == full_cb.ema_counts[name] == 10  # collected up to end_step
    assert full_w.keys() == res_w.keys()
    for k in full_w:
        assert torch.allclose(res_w[k], full_w[k], rtol=1e-5, atol=1e-6), k
