"""PRILoRACallback on plain peft models (fast, hand-built) and on CausalLMModule with an NF4 base."""
import math

import pytest
import pytorch_lightning as pl
import torch
from prilora_helpers import PlainPeftModule, token_loader, trainer_kwargs, vector_loader
from pytorch_lightning.callbacks import ModelCheckpoint

from qft.prilora import PRILoRACallback, build_patterns, rank_schedule
from qft.prilora import math as pm


def _lora_layers(model, adapter="default"):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def test_plain_peft_with_build_patterns_prunes_and_masks_gradients(tmp_path):
    ranks, alphas = build_patterns(3, 2, 6)
    module = PlainPeftModule(rank_pattern=ranks, alpha_pattern=alphas)
    cb = PRILoRACallback(r_start=2, r_end=6, start_step=1, end_step=4, interval=1, final_sparsity=0.5)
    trainer = pl.Trainer(max_steps=6, callbacks=[cb], **trainer_kwargs(tmp_path, enable_checkpointing=False))
    trainer.fit(module, vector_loader())
    assert cb.last_pruned_step == 4
    layers = _lora_layers(module.model)
    assert [m.r["default"] for m in layers.values()] == [2, 4, 6]
    for name, m in layers.items():
        w, mask = m.lora_A["default"].weight, cb.masks[name]
        assert ((~mask).sum(1) == 4).all()  # half of each 8-wide row pruned
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    # gradients of pruned entries are masked (the tensor hook), kept ones are not
    x, y = next(iter(vector_loader()))
    torch.nn.functional.mse_loss(module.model(x), y).backward()
    for name, m in layers.items():
        g, mask = m.lora_A["default"].weight.grad, cb.masks[name]
        assert (g[~mask] == 0).all() and g[mask].abs().sum() > 0


def test_uniform_ranks_are_caught_after_peft(tmp_path):
    module = PlainPeftModule(r=8)  # no rank_pattern: peft gives every layer r=8
    cb = PRILoRACallback(r_start=2, r_end=6, start_step=1, end_step=4)
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], **trainer_kwargs(tmp_path, enable_checkpointing=False))
    with pytest.raises(RuntimeError, match="planned rank"):
        trainer.fit(module, vector_loader())
    assert trainer.global_step == 0


def test_ema_counts_training_forwards_only():
    module = PlainPeftModule(rank_pattern=build_patterns(3, 2, 6)[0], alpha_pattern=build_patterns(3, 2, 6)[1])
    cb = PRILoRACallback(r_start=2, r_end=6, start_step=1, end_step=4, ema_beta=0.5)
    cb.setup(None, module, "fit")  # plain module: hooks run now
    first = next(n for n in cb._lora if ".layers.0." in n)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    module.train()
    module.model(x1)
    assert torch.allclose(cb.emas[first], x1.pow(2).mean(0))
    module.model(x2)
    assert torch.allclose(cb.emas[first], 0.5 * x1.pow(2).mean(0) + 0.5 * x2.pow(2).mean(0))
    with torch.no_grad():
        module.model(torch.randn(4, 8) * 100)
    module.eval()
    module.model(torch.randn(4, 8) * 100)
    assert cb.ema_counts[first] == 2


@pytest.mark.parametrize("regrow", [False, True])
def test_regrow_restores_a_pruned_entry_with_its_value(regrow):
    r = build_patterns(1, 2, 2)
    module = PlainPeftModule(rank_pattern=r[0], alpha_pattern=r[1], layers=1, width=4)
    cb = PRILoRACallback(r_start=2, r_end=2, start_step=0, end_step=10, final_sparsity=0.25,
                         sparsity_schedule="linear", regrow=regrow)
    cb.setup(None, module, "fit")
    cb.start_step, cb.end_step = 0, 10
    (name, lin), = cb._lora.items()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    cb.emas[name] = torch.tensor([0.01, 1.0, 1.0, 1.0])  # column 0 unimportant
    cb.prune(10)  # sparsity 0.25 -> one entry per row
    assert cb.masks[name].tolist() == [[False, True, True, True], [False, True, True, True]]
    assert lin.weight[:, 0].tolist() == [0.0, 0.0]
    cb.emas[name] = torch.tensor([100.0, 0.0001, 1.0, 1.0])  # now column 0 matters, column 1 does not
    cb.prune(11)
    if regrow:
        assert cb.masks[name].tolist() == [[True, False, True, True], [True, False, True, True]]
        assert lin.weight.tolist() == [[1.0, 0.0, 3.0, 4.0], [4.0, 0.0, 2.0, 1.0]]
    else:
        assert cb.masks[name].tolist() == [[False, True, True, True], [False, True, True, True]]
        assert lin.weight[:, 0].tolist() == [0.0, 0.0]


def test_target_modules_that_match_nothing_fail_before_training(tmp_path):
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", adapter="lora", target_modules=["q_proj", "qq_proj"])
    trainer = pl.Trainer(max_steps=2, callbacks=[PRILoRACallback(start_step=0, end_step=1)],
                         **trainer_kwargs(tmp_path, enable_checkpointing=False))
    with pytest.raises(ValueError, match="qq_proj"):
        trainer.fit(module, token_loader(2))
    assert trainer.global_step == 0
    assert not _lora_layers(module.model)  # failed at the base hook, before adapters were attached


def test_nf4_causal_lm_ranks_pruning_logging_plot(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32", lr=1e-2,
                            gradient_checkpointing=True)  # recomputed forwards in backward must not count twice
    cb = PRILoRACallback(start_step=2, end_step=6, interval=2, final_sparsity=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(max_steps=8, callbacks=[cb, ckpt],
                         **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                                          limit_val_batches=1, val_check_interval=4, num_sanity_val_steps=1))
    trainer.fit(module, token_loader(8), token_loader(1, seed=9))
    layers = _lora_layers(module.model)
    planned = rank_schedule(4, 4, 12)
    assert len(layers) == 4 * 7  # all-linear: q,k,v,o,gate,up,down in 4 layers
    for name, m in layers.items():
        assert type(m).__module__.endswith("lora.bnb")  # peft's 4-bit LoRA layer
        assert m.r["default"] == planned[pm.layer_index(name, "model.layers")]
        assert m.scaling["default"] == pytest.approx(16 / 8)  # alpha_policy='scale' keeps alpha/r
        w, mask = m.lora_A["default"].weight, cb.masks[name]
        assert ((~mask).sum(1) == w.shape[1] // 2).all()
        assert (w[~mask] == 0).all()
        # training forwards up to end_step only: sanity check and validation do not count
        assert cb.ema_counts[name] == 6
    assert cb.last_pruned_step == 6
    logged = trainer.logged_metrics
    assert logged["prilora/rank/layer_00"] == 4 and logged["prilora/rank/layer_03"] == 12
    assert logged["prilora/sparsity/layer_02"] == pytest.approx(0.5)
    assert (tmp_path / "ckpt" / "prilora_layers.png").stat().st_size > 1000
    # the adapter-only checkpoint carries the PRILoRA state
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=False)["callbacks"]
    (cb_state,) = [v for k, v in state.items() if "PRILoRACallback" in k]
    assert set(cb_state["masks"]) == set(layers) and cb_state["last_pruned_step"] == 6
    assert math.isclose(cb_state["target_sparsity"], 0.5)
