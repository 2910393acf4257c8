"""Under 2-process gloo DDP every rank ends with the same observer ranges (all-reduced min/max)."""
import pytest
import pytorch_lightning as pl
import torch
from qat_helpers import TinyNet

from qft.qat import QATCallback
from qft.quant import QuantScheme


class Dump(pl.Callback):
    """Each rank writes its fake-quant buffers and per-step schedule to ``out/rank{r}.pt``."""

    def __init__(self, out):
        self.out, self.enabled, self.updates = str(out), [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.enabled.append(bool(pl_module.body[0].qat_enabled))
        self.updates.append(int(pl_module.body[0].input_quant.num_updates))

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()
                 if torch.is_tensor(v) and ("input_quant" in k or "weight_scale" in k)}
        torch.save({"state": state, "enabled": self.enabled, "updates": self.updates,
                    "shard_min": pl_module._shard_min}, f"{self.out}/rank{trainer.global_rank}.pt")


class ShardNet(TinyNet):
    def on_train_batch_start(self, batch, batch_idx):
        self._shard_min = batch[0].min().item()


def test_observers_identical_across_two_gloo_ranks(tmp_path):
    cb = QATCallback(weight=QuantScheme(bits=4, group_size=32),
                     activation=QuantScheme(bits=8, granularity="per_tensor"), start_step=1, freeze_observers_step=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb, Dump(tmp_path)],
                         default_root_dir=tmp_path)
    model = ShardNet()
    trainer.fit(model)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # each rank saw a different half of the data ...
    assert r0["shard_min"] != r1["shard_min"]
    # ... yet holds the same ranges, equal to the global range of the step-1 batches (one update, then frozen)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["state"]["body.0.input_quant.min_val"].item() == pytest.approx(model.x.min().item())
    assert r0["state"]["body.0.input_quant.max_val"].item() == pytest.approx(model.x.max().item())
    assert r0["enabled"] == r1["enabled"] == [False, True, True]
    assert r0["updates"] == r1["updates"] == [0, 1, 1]
