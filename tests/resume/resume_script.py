"""One fit of test_sigkill_resume.py, in its own process so that it can be SIGKILLed for real.

``python resume_script.py CASE OUT [--kill-at STEP] [--ckpt PATH]``

CASE is ``qlora-prilora-qat`` (NF4 base, PRILoRA ranks and A-pruning, QAT on the merged weight with learned
scales: the demo's composition) or ``qat`` (full fine-tune, learned weight scales and a static activation
observer that freezes mid-run). The data is qft's own ``QFTDataModule`` (16 batches per epoch), and
checkpoints are written every 3 steps with ``last.ckpt``. ``--kill-at`` sends SIGKILL to this very
process at the start of that step; ``--ckpt`` resumes from a checkpoint. A run that ends writes
``OUT/final.ckpt`` (everything a checkpoint holds after the last step) and ``OUT/result.json``.
"""
import argparse
import json
import os
import signal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from qft.data import QFTDataModule
from qft.module import CausalLMModule
from qft.prilora import PRILoRACallback
from qft.qat import QATCallback
from qft.quant import QuantScheme

MAX_STEPS = 12


class KillAt(pl.Callback):
    """SIGKILL this process when ``step`` is about to start: no clean-up, no final checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build(case):
    w4 = QuantScheme(bits=4, group_size=32, symmetric=True)
    if case == "qlora-prilora-qat":
        module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32",
                                lr=1e-2, warmup_steps=2, save_adapter=False)
        callbacks = [PRILoRACallback(r_start=2, r_end=6, start_step=2, end_step=10, interval=2, final_sparsity=0.5,
                                     plot=False),
                     QATCallback(weight=w4, start_step=4, range_learning=True, convert_on_fit_end=False)]
    elif case == "qat":
        module = CausalLMModule(model="tiny-llama", compute_dtype="float32", lr=1e-3, warmup_steps=2,
                                save_adapter=False)
        callbacks = [QATCallback(weight=w4, activation=QuantScheme(bits=8, granularity="per_tensor", symmetric=False),
                                 start_step=2, freeze_observers_step=8, range_learning=True,
                                 convert_on_fit_end=False)]
    else:
        raise SystemExit(f"unknown case {case!r}")
    data = QFTDataModule(task="synthetic", num_train=64, num_val=8, batch_size=4, seq_len=64)
    return module, callbacks, data


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case")
    p.add_argument("out")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--ckpt")
    a = p.parse_args()
    pl.seed_everything(0)
    module, callbacks, data = build(a.case)
    callbacks.append(ModelCheckpoint(dirpath=os.path.join(a.out, "ckpt"), every_n_train_steps=3, save_last=True))
    if a.kill_at is not None:
        callbacks.append(KillAt(a.kill_at))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, callbacks=callbacks, logger=False,
                         default_root_dir=a.out, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data, ckpt_path=a.ckpt)
    trainer.save_checkpoint(os.path.join(a.out, "final.ckpt"))
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"global_step": trainer.global_step, "loss": float(trainer.callback_metrics["train/loss"]),
                   "epoch": trainer.current_epoch}, f)


if __name__ == "__main__":
    main()
