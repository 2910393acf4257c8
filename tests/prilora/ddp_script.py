"""2-process gloo DDP run on CPU for test_prilora_ddp.py: each rank trains on different data and dumps its masks.

Run as ``python ddp_script.py OUTDIR``; Lightning's "ddp" strategy re-executes this script for rank 1.
Besides the synced masks it records the mask each rank *would* have computed from its local,
un-averaged EMAs, so the test can show that without the all-reduce the ranks would disagree.
"""
import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prilora_helpers import token_loader  # noqa: E402

from qft.module import CausalLMModule  # noqa: E402
from qft.prilora import PRILoRACallback  # noqa: E402
from qft.prilora import math as pm  # noqa: E402


class RankDataModule(CausalLMModule):
    def train_dataloader(self):
        return token_loader(4, seed=1000 + self.global_rank)  # different data on each rank


class RecordingPRILoRA(PRILoRACallback):
    def _all_reduce_emas(self):
        self.local_masks = {}
        for name, lin in self._lora.items():
            old = self.masks.get(name, torch.ones(lin.weight.shape, dtype=torch.bool))
            score = pm.importance(lin.weight, self.emas[name])
            self.local_masks[name] = pm.update_mask(score, old, self.target_sparsity, self.config.regrow)
        super()._all_reduce_emas()


def main(out):
    pl.seed_everything(0)
    module = RankDataModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32", lr=1e-2)
    cb = RecordingPRILoRA(start_step=1, end_step=4, interval=1, final_sparsity=0.5, plot=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=out)
    trainer.fit(module)
    lora_a = {k: v.detach().clone() for k, v in module.model.named_parameters() if "lora_A" in k}
    torch.save({"masks": cb.masks, "local_masks": cb.local_masks, "emas": cb.emas, "lora_A": lora_a,
                "world_size": trainer.world_size, "last_pruned_step": cb.last_pruned_step},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
