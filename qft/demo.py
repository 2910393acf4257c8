"""``make demo``: the whole qft pipeline on the embedded SmolLM2-135M-Instruct, on a CPU.

1. accuracy of the base model on held-out 3-digit additions (greedy exact match);
2. NF4 QLoRA fine-tune with PRILoRA adapters (ranks 4 -> 12 with depth, A pruned by importance);
3. export: merge the adapters into the original full-precision base (``--merge-into dequantized_nf4``:
   into the NF4 base they were trained on), GPTQ 4-bit, Hugging Face checkpoint;
4. accuracy of the fine-tuned QLoRA model and of the exported int4 checkpoint (run in pure torch);
5. one table: accuracies, sizes on disk and where everything is.

    python -m qft.demo [--steps 160] [--out runs/demo-<time>]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="qft-demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--num-val", type=int, default=100, help="held-out problems for accuracy")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="64 divides SmolLM2's 576 and 1536 (128 does not)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--merge-into", default="original", choices=["original", "dequantized_nf4"],
                   help="merge into the released fp base (default, Hugging Face's recipe) or into the dequantized "
                        "NF4 base the adapters were trained on (measured: 92%% int4 vs 82%%, BENCHMARKS.md)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<time>; must not exist)")
    args = p.parse_args(argv)

    from . import models
    from .data import QFTDataModule
    from .evaluate import task_accuracy
    from .export import load_quantized
    from .export.callback import GPTQExportCallback
    from .module import CausalLMModule
    from .prilora import PRILoRACallback

    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists; qft never overwrites a result. Pick another.")
    t_start = time.perf_counter()
    pl.seed_everything(0, verbose=False)

    print(f"[1/4] base model {args.model}: accuracy on {args.num_val} held-out additions ...", flush=True)
    base, tok = models.load(args.model)
    acc_base = task_accuracy(base, tok, num_val=args.num_val)
    del base

    print(f"[2/4] NF4 QLoRA + PRILoRA fine-tune, {args.steps} steps of {args.batch_size} ...", flush=True)
    module = CausalLMModule(model=args.model, quantization="nf4", adapter="lora", lora_r=8, lora_alpha=16,
                            lr=args.lr, warmup_steps=10)
    data = QFTDataModule(task="synthetic", batch_size=args.batch_size, num_train=args.steps * args.batch_size,
                         num_val=args.num_val, seq_len=64)
    prilora = PRILoRACallback(r_start=4, r_end=12, final_sparsity=0.5, interval=10)
    export_dir = out / "gptq-int4"
    exporter = GPTQExportCallback(export_dir, bits=args.bits, group_size=args.group_size, calibration=data,
                                  n_samples=args.calib_samples, seq_len=64, merge_into=args.merge_into,
                                  progress=False)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, default_root_dir=out,
                         callbacks=[prilora, exporter], limit_val_batches=2, val_check_interval=args.steps,
                         log_every_n_steps=10, enable_progress_bar=False, enable_model_summary=False)
    t_fit = time.perf_counter()
    trainer.fit(module, data)  # GPTQExportCallback merges and quantizes at fit end
    fit_s = time.perf_counter() - t_fit

    print("[3/4] accuracy of the fine-tuned QLoRA model ...", flush=True)
    acc_qlora = task_accuracy(module.model, module.tokenizer, num_val=args.num_val)

    print("[4/4] accuracy of the exported GPTQ int4 checkpoint (pure torch) ...", flush=True)
    qmodel = load_quantized(exporter.checkpoint_path)
    acc_int4 = task_accuracy(qmodel, models.load_tokenizer(str(exporter.checkpoint_path)), num_val=args.num_val)

    base_file = models.smollm2_path() / "model.safetensors" if args.model == "smollm2-135m" else None
    rows = [
        ("base (fp32)", acc_base, _size(base_file) if base_file else None, str(base_file or args.model)),
        ("QLoRA NF4 + PRILoRA", acc_qlora, _size(module.adapter_dir), f"{module.adapter_dir} (adapters)"),
        (f"GPTQ int{args.bits} g{args.group_size} export", acc_int4, _size(exporter.checkpoint_path),
         str(exporter.checkpoint_path)),
    ]
    print()
    print(f"{'model':<28}{'accuracy':>10}{'on disk':>14}  artefact")
    for name, acc, size, where in rows:
        print(f"{name:<28}{acc:>10.1%}{_mb(size) if size else '-':>14}  {where}")
    drift = (exporter.summary or {}).get("drift")
    if drift:
        print(f"\nmerge drift vs the trained QLoRA model: {drift}")
    print(f"fit {fit_s:.0f} s (incl. export), total {time.perf_counter() - t_start:.0f} s; run dir {out}")
    return {"acc_base": acc_base, "acc_qlora": acc_qlora, "acc_int4": acc_int4, "out": str(out)}


if __name__ == "__main__":
    main()
