"""Multi-device fine-tuning with qft: DDP or FSDP, launched by Lightning or by torchrun.

    # Lightning launches the processes (2 GPUs, or 2 CPU processes over gloo with --accelerator cpu)
    python examples/multi_gpu.py --devices 2 --strategy ddp
    python examples/multi_gpu.py --devices 2 --strategy fsdp --quantization none  # FSDP2 (fully_shard)
    # torchrun launches them; Lightning picks the ranks up from the environment
    torchrun --nproc_per_node 2 examples/multi_gpu.py --devices 2 --strategy ddp

NF4 QLoRA trains under DDP. ``--strategy fsdp`` is Lightning's ModelParallelStrategy: the module
shards its full-precision model with FSDP2 (``qft.sharding``), full fine-tune or LoRA; it runs on CPUs
over gloo too. qft refuses NF4 and the whole-weight callbacks (PRILoRA, the GPTQ export) under FSDP at
set-up. Every piece of qft state that ranks must agree on (QAT observer ranges, PRILoRA statistics and
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
    p.add_argument("--adapter", default="lora", choices=["lora", "none"], help="none: full fine-tune")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--root", default="runs/multi_gpu")
    p.add_argument("--report", help="write each rank's final checksums here, and rank 0's trainable weights "
                                    "(used by the tests)")
    p.add_argument("--qat", action="store_true", help="QAT on the int4 g64 grid, min-max scales (fake-quant only: "
                                                      "convert or export after fit)")
    p.add_argument("--export", help="also export GPTQ int4 (group 64) here at fit end: rank 0 works, the others wait")
    args = p.parse_args(argv)

    from qft.data import QFTDataModule
    from qft.module import CausalLMModule

    pl.seed_everything(0)
    module = CausalLMModule(model=args.model, quantization=args.quantization, adapter=args.adapter, lora_r=8, lr=1e-3,
                            save_adapter=args.adapter == "lora")
    data = QFTDataModule(task="synthetic", batch_size=args.batch_size, num_train=args.num_train, num_val=32)
    strategy = args.strategy
    if strategy == "fsdp":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    callbacks = []
    if args.qat:
        from qft.qat import QATCallback
        from qft.quant import QuantScheme

        callbacks.append(QATCallback(weight=QuantScheme(bits=4, group_size=64, symmetric=True), start_step=1))
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
        report(args.report, trainer, module, args.export)


def report(out, trainer, module, export):
    """Each rank's view after fit: checksums of the whole trainable weights (gathered from shards under
    FSDP: a collective), how much of them the rank holds, and whether the export is visible."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    whole, local = {}, 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            local += (p.to_local() if isinstance(p, DTensor) else p).numel()
            whole[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().contiguous()
    rep = {"rank": trainer.global_rank, "world_size": trainer.world_size,
           "checksum": float(sum(t.double().sum() for t in whole.values())),
           "abs_sum": float(sum(t.double().abs().sum() for t in whole.values())),
           "numel": sum(t.numel() for t in whole.values()), "local_numel": local,
           "loss": float(trainer.callback_metrics["train/loss"]),
           # after fit returns, every rank must see the finished export (the others waited for rank 0)
           "export_seen": bool(export) and os.path.isfile(os.path.join(export, "config.json"))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(rep, f)
    if trainer.global_rank == 0:
        save_file(whole, os.path.join(out, "trainable.safetensors"))

if __name__ == "__main__":
    main()
