"""``make demo``: one fine-tune of the embedded SmolLM2-135M-Instruct, deployed int4 by two roads, on a CPU.

1. accuracy of the base model on held-out 3-digit additions (greedy exact match);
2. quantization-aware QLoRA (``recipes/qa_qlora.yaml``): NF4 base, PRILoRA adapters (ranks 4 -> 12
   with depth, A pruned by importance), and from ``--qat-start`` on, QAT on the merged weight
   ``W_nf4 + B@A`` (min-max scales, straight-through rounding); at fit end ``GPTQExportCallback`` keeps
   the learned scales and, with general text at hand, GPTQ re-solves the codes so that task windows
   reproduce the fine-tune and general text the released base (its measured default);
3. Hugging Face's recipe from the same adapters: merge into the original fp base, then GPTQ int4;
4. for the QLoRA model and each exported checkpoint (run in pure torch): task accuracy, WikiText-2
   perplexity (first 16 x 1024 tokens of ``../shared/data/wikitext2_test.raw``, when present) and size;
5. one table, and ``summary.json`` in the run directory.

Both roads calibrate on the same windows: the task, with a quarter of them from general text
(WikiText-2 windows from the second half of its tokens, disjoint from the evaluation windows, per
``../shared/data/README.md``) when that file is present, else the task alone.

    python -m qft.demo [--steps 120] [--qat-start 75] [--out runs/demo-<time>]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .progress import ProgressLines

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.raw"
EVAL_WINDOWS, EVAL_LEN = 16, 1024


def _size(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def wikitext(tokenizer, path=None):
    """``(eval_ids, calibration_ids)`` of WikiText-2 test by the data README's convention (evaluation:
    the first 16 x 1024 tokens; calibration: the second half of the tokens), or ``(None, None)``."""
    path = Path(path or os.environ.get("QFT_WIKITEXT", WIKITEXT))
    if not path.is_file():
        return None, None
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])
    return ids[: EVAL_WINDOWS * EVAL_LEN], ids[ids.numel() // 2:]


def measure(model, tokenizer, num_val: int, wiki_ids) -> dict:
    """Task accuracy (greedy, fp32) and, with WikiText at hand, perplexity (bf16 autocast where the CPU
    has native bf16: 28 s instead of 47 s for 16 x 1024 tokens, the same figure to 0.1%)."""
    from .evaluate import perplexity, task_accuracy
    from .module import bf16_supported

    out = {"acc": task_accuracy(model, tokenizer, num_val=num_val)}
    dtype = torch.bfloat16 if bf16_supported(next(model.parameters()).device) else torch.float32
    out["wikitext_ppl"] = None if wiki_ids is None else perplexity(model, wiki_ids, EVAL_LEN, EVAL_WINDOWS, dtype=dtype)
    return out


def qa_qlora(model: str, steps: int, batch_size: int, lr: float, num_val: int, qat_start: int | None,
             group_size: int, root: Path, export_dir: Path | None = None, progress: bool = True,
             general=None, calib_samples: int = 64, calib_len: int = 64):
    """Fit the quantization-aware QLoRA recipe; returns ``(module, data, callbacks)``.

    ``qat_start=None`` trains plain QLoRA + PRILoRA (no QAT). With ``export_dir``, the export callback
    writes the int4 checkpoint there at fit end, with its defaults: given ``general`` text (tokens), the
    learned grid's codes are refined so that task windows keep the fine-tune and general windows the
    base; without it, the learned grid is written as it is.
    """
    import pytorch_lightning as pl

    from .data import QFTDataModule
    from .export import GPTQExportCallback
    from .module import CausalLMModule
    from .prilora import PRILoRACallback
    from .qat import QATCallback
    from .quant import QuantScheme

    # eager attention: on this 2-core CPU with ~45-token chats, 2.5 s per step against SDPA's 2.8 s, and
    # 2.55 s against 3.3 s once QAT is on (SDPA's CPU flash backward is the slow part; BENCHMARKS.md)
    module = CausalLMModule(model=model, quantization="nf4", adapter="lora", lora_r=8, lora_alpha=16, lr=lr,
                            warmup_steps=10, attention="eager")
    data = QFTDataModule(task="synthetic", batch_size=batch_size, num_train=steps * batch_size, num_val=num_val,
                         seq_len=64)
    callbacks = [PRILoRACallback(r_start=4, r_end=12, final_sparsity=0.5, interval=10)]
    if qat_start is not None:
        callbacks.append(QATCallback(weight=QuantScheme(bits=4, group_size=group_size), start_step=qat_start))
    if export_dir is not None:
        callbacks.append(GPTQExportCallback(export_dir, progress=False, general_calibration=general,
                                            n_samples=calib_samples, seq_len=calib_len))
    if progress:
        callbacks.append(ProgressLines(every=10))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=root, callbacks=callbacks,
                         limit_val_batches=2, val_check_interval=steps, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return module, data, callbacks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="qft-demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--qat-start", type=int, default=75, help="optimizer step from which QAT is on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--num-val", type=int, default=100, help="held-out problems for accuracy")
    p.add_argument("--group-size", type=int, default=64, help="64 divides SmolLM2's 576 and 1536 (128 does not)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=64)
    p.add_argument("--wikitext", default=None, help=f"WikiText-2 test file (default {WIKITEXT}, if present)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<time>; must not exist)")
    p.add_argument("--verbose", action="store_true", help="keep the library lines qft silences (qft.console)")
    args = p.parse_args(argv)
    if not 0 <= args.qat_start < args.steps:
        raise ValueError(f"--qat-start {args.qat_start}: must be in [0, --steps={args.steps}).")

    import pytorch_lightning as pl

    from . import models
    from .console import quiet
    from .export import calibration_mix, load_quantized
    from .export.calibration import GENERAL_FRACTION, model_max_length
    from .export.config import GPTQConfig
    from .export.pipeline import export
    from .layers import fake_quant_disabled

    quiet(args.verbose)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists; qft never overwrites a result. Pick another.")
    t_start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    tok = models.load_tokenizer(args.model)
    wiki_eval, wiki_calib = wikitext(tok, args.wikitext)

    print(f"[1/5] base model {args.model}: accuracy on {args.num_val} held-out additions ...", flush=True)
    base = models.load_model(args.model)
    acc_base = measure(base, tok, args.num_val, None)["acc"]
    del base

    road = "refines its codes toward the base on general text" if wiki_calib is not None else "writes it as is"
    print(f"[2/5] quantization-aware QLoRA: NF4 + PRILoRA, {args.steps} steps of {args.batch_size}, QAT on the "
          f"merged weight (int4 g{args.group_size}) from step {args.qat_start}; the export keeps the learned grid "
          f"and {road} ...", flush=True)
    qft_dir, hf_dir = out / "qft-int4", out / "hf-recipe-int4"
    t_fit = time.perf_counter()
    module, data, callbacks = qa_qlora(args.model, args.steps, args.batch_size, args.lr, args.num_val,
                                       args.qat_start, args.group_size, out, export_dir=qft_dir, general=wiki_calib,
                                       calib_samples=args.calib_samples, calib_len=args.calib_len)
    fit_s = time.perf_counter() - t_fit
    qft_summary = next(cb for cb in callbacks if hasattr(cb, "checkpoint_path")).summary

    print("[3/5] the fine-tuned model: its QLoRA adapters on NF4 (fake-quant off), and as trained (on) ...",
          flush=True)
    with fake_quant_disabled(module.model):  # (its WikiText-2 perplexity: BENCHMARKS.md; skipped for time)
        acc_qlora = measure(module.model, tok, args.num_val, None)["acc"]
    acc_trained = measure(module.model, tok, args.num_val, None)["acc"]

    print("[4/5] Hugging Face's recipe from the same adapters: merge into the original fp base, GPTQ int4 ...",
          flush=True)
    calib = calibration_mix(data, wiki_calib, tok, args.calib_samples, args.calib_len, GENERAL_FRACTION,
                            max_length=model_max_length(module.model))
    cfg = GPTQConfig(bits=4, group_size=args.group_size)
    hf_summary = export(module.model, tok, calib, hf_dir, cfg, base_name=args.model, merge_into="original",
                        qat_grid="resolve", progress=False)

    print("[5/5] the exported checkpoints, run in pure torch ...", flush=True)
    exports = {}
    for road, path, summary in (("hf_recipe", hf_dir, hf_summary), ("qft", qft_dir, qft_summary)):
        q = load_quantized(path, dtype=torch.float32)
        exports[road] = {**measure(q, tok, args.num_val, wiki_eval), "bytes": _size(path), "path": str(path.resolve()),
                         "export_s": round(summary["seconds"], 1), "merge_into": summary["merge_into"],
                         "qat_grid": summary["qat_grid"], "general_target": summary["general_target"]}
        del q

    summary = {"model": args.model, "acc_base": acc_base, "acc_qlora": acc_qlora, "acc_trained_fake_quant": acc_trained,
               "steps": args.steps, "qat_start": args.qat_start,
               "group_size": args.group_size, "calibration": "task+wikitext" if wiki_calib is not None else "task",
               "fit_s": round(fit_s, 1), "exports": exports, "adapter_dir": module.adapter_dir,
               "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary, out)
    return summary


def _print_table(s: dict, out: Path) -> None:
    ppl = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [("base (fp32)", s["acc_base"], None, None),
            ("QLoRA NF4 + PRILoRA adapters", s["acc_qlora"], None, None),
            ("  as trained (fake-quant on)", s["acc_trained_fake_quant"], None, None),
            ("int4: Hugging Face's recipe", s["exports"]["hf_recipe"]["acc"], s["exports"]["hf_recipe"]["wikitext_ppl"],
             s["exports"]["hf_recipe"]["bytes"]),
            ("int4: qft quantization-aware", s["exports"]["qft"]["acc"], s["exports"]["qft"]["wikitext_ppl"],
             s["exports"]["qft"]["bytes"])]
    print()
    print(f"{'model':<32}{'accuracy':>10}{'WikiText-2 ppl':>16}{'on disk':>12}")
    for name, acc, p, size in rows:
        print(f"{name:<32}{acc:>10.1%}{ppl(p):>16}{'-' if size is None else f'{size / 2**20:.1f} MB':>12}")
    q = s["exports"]["qft"]
    how = ("the grid QAT learned, its codes refined by GPTQ: task windows keep the fine-tune, general text the base"
           if q["general_target"] == "base" else "the grid QAT learned, written as is")
    print(f"\n(hf recipe: merge into the original fp weights + GPTQ, {s['calibration']} calibration; qft: {how})"
          f"\nfit {s['fit_s']:.0f} s, total {s['seconds']:.0f} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
