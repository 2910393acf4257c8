"""Multi-device fine-tuning with qft: DDP or FSDP, launched by Lightning or by torchrun.

    # Lightning launches the processes (2 GPUs, or 2 CPU processes over gloo with --accelerator cpu)
    python examples/multi_gpu.py --devices 2 --strategy ddp
    python examples/multi_gpu.py --devices 2 --strategy fsdp --quantization none
    # torchrun launches them; Lightning picks the ranks up from the environment
    torchrun --nproc_per_node 2 examples/multi_gpu.py --devices 2 --strategy ddp

NF4 QLoRA trains under DDP; FSDP shards full-precision weights (use --quantization none with it).
Every piece of qft state that ranks must agree on (QAT observer ranges, PRILoRA statistics and
masks) is all-reduced by its callback, so the ranks stay identical.
"""
from __future__ import annotations

import argparse
import json
import os

import pytorch_lightning as pl


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4", choices=["none", "nf4", "nf4-dq"])
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--root", default="runs/multi_gpu")
    p.add_argument("--report", help="write each rank's final adapter checksum here (used by the tests)")
    p.add_argument("--export", help="also export GPTQ int4 (group 64) here at fit end: rank 0 works, the others wait")
    args = p.parse_args(argv)

    from qft.data import QFTDataModule
    from qft.module import CausalLMModule

    pl.seed_everything(0)
    module = CausalLMModule(model=args.model, quantization=args.quantization, adapter="lora", lora_r=8, lr=1e-3)
    data = QFTDataModule(task="synthetic", batch_size=args.batch_size, num_train=args.num_train, num_val=32)
    strategy = args.strategy
    if strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        strategy = FSDPStrategy(use_orig_params=True)  # LoRA: frozen and trainable params share flat buffers
    callbacks = []
    if args.export:
        from qft.export.callback import GPTQExportCallback

        # calibration=None: windows of the trainer's DataModule (the synthetic task here)
        callbacks.append(GPTQExportCallback(args.export, bits=4, group_size=64, n_samples=16, seq_len=32,
                                            progress=False))
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                         max_steps=args.max_steps, default_root_dir=args.root, limit_val_batches=2,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, data)
    if args.report:
        trainable = [p.detach().double() for p in module.parameters() if p.requires_grad]
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                  "checksum": float(sum(t.sum() for t in trainable)),
                  "abs_sum": float(sum(t.abs().sum() for t in trainable)),
                  "loss": float(trainer.callback_metrics["train/loss"]),
                  # after fit returns, every rank must see the finished export (the others waited for rank 0)
                  "export_seen": bool(args.export) and os.path.isfile(os.path.join(args.export, "config.json"))}
        os.makedirs(args.report, exist_ok=True)
        with open(os.path.join(args.report, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
