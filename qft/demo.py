"""``make demo``: one fine-tune of the embedded SmolLM2-135M-Instruct, deployed int4 by two roads, on a CPU.

1. quantization-aware QLoRA (``recipes/qa_qlora.yaml``): NF4 base, PRILoRA adapters (ranks 4 -> 12
   with depth, A pruned by importance). At ``--qat-start`` (default: ``--steps``, when training ends) the
   merged weights ``W_nf4 + B@A`` get an int4 grid solved by GPTQ on task windows and general text (the
   general windows anchored to the released base, ``qft.qat.solve``), and the fit ends on that grid. At fit
   end ``GPTQExportCallback`` writes the grid as it is (``qat_grid="keep"``): the checkpoint is the model as
   trained, bit for bit (``matches_trained``). Why at the end: every step trained on the fixed grid after
   the solve cost task accuracy (BENCHMARKS.md, "Main job": 80.7% with none, 80.6% with one; of 120 steps,
   79.6% solved at step 119, 75.0% at 110, 73.9% at 40), and adapters trained on the grid lose their fp view;
2. Hugging Face's recipe from the same adapters: merge into the original fp base, then GPTQ int4;
3. four rows, each measured the same way: the QLoRA adapters on NF4 (fake-quant off), the model as
   trained (fake-quant on), and the two exported checkpoints (run in pure torch): teacher-forced exact
   match on 1000 held-out additions (``acc_1000`` and its standard error) and WikiText-2 perplexity
   (first 16 x 1024 tokens of ``../shared/data/wikitext2_test.raw``, when present);
4. one table, and ``summary.json`` in the run directory.

Both roads calibrate on the same kind of windows: the task, with a quarter from general text (WikiText-2
from its second half, disjoint from the evaluation windows, per ``../shared/data/README.md``) when that
file is present, else the task alone (then general ability is not protected, and the output says so).

    python -m qft.demo [--steps STEPS] [--qat-start STEPS] [--out runs/demo-<time>]
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


def row(model, tokenizer, wiki_ids) -> dict:
    """One row of the table: teacher-forced exact match on 1000 held-out problems (bf16 where the CPU has
    it, as every row) with its standard error, and WikiText-2 perplexity (None without the file)."""
    from .evaluate import answer_accuracy, perplexity
    from .module import bf16_supported

    dtype = torch.bfloat16 if bf16_supported(next(model.parameters()).device) else torch.float32
    acc = answer_accuracy(model, tokenizer, num_val=1000, dtype=dtype)
    ppl = None if wiki_ids is None else perplexity(model, wiki_ids, EVAL_LEN, EVAL_WINDOWS, dtype=dtype)
    return {"acc_1000": acc["acc"], "acc_1000_se": round(acc["se"], 4), "wikitext_ppl": ppl}


def qa_qlora(model: str, steps: int, batch_size: int, lr: float, num_val: int, qat_start: int | None,
             group_size: int, root: Path, export_dir: Path | None = None, progress: bool = True,
             general=None, calib_samples: int = 64, calib_len: int = 64, init="minmax", qat_grid=None):
    """Fit the quantization-aware QLoRA recipe; returns ``(module, data, callbacks)``.

    ``qat_start=None`` trains plain QLoRA + PRILoRA (no QAT). ``init``: the QAT grid (``QATConfig.init``:
    ``"minmax"``, or a ``GridSolve`` solved at ``qat_start``). With ``export_dir``, the export callback
    writes the int4 checkpoint there at fit end (``qat_grid``, with ``general`` text for its refine road).
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
        callbacks.append(QATCallback(weight=QuantScheme(bits=4, group_size=group_size), start_step=qat_start,
                                     init=init))
    if export_dir is not None:
        callbacks.append(GPTQExportCallback(export_dir, progress=False, general_calibration=general,
                                            n_samples=calib_samples, seq_len=calib_len, qat_grid=qat_grid))
    if progress:
        callbacks.append(ProgressLines(every=10))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=root, callbacks=callbacks,
                         limit_val_batches=2, val_check_interval=steps, log_every_n_steps=10,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return module, data, callbacks


def matches_trained(trained, path, vocab_size: int) -> dict:
    """Whether the checkpoint at ``path`` computes the trained model's logits exactly on a fixed batch (and
    how far apart they are), loaded in the dtype and attention kernel the trained model runs in."""
    from .export import load_quantized

    x = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    # in the trained model's dtype and attention kernel: the same computation, so equal means equal
    q = load_quantized(path, dtype=trained.get_input_embeddings().weight.dtype).eval()
    q.set_attn_implementation(trained.config._attn_implementation)
    was = trained.training
    trained.eval()
    with torch.no_grad():
        a, b = trained(input_ids=x).logits.float(), q(input_ids=x).logits.float()
    trained.train(was)
    return {"matches_trained": bool(torch.equal(a, b)), "max_logit_diff": float((a - b).abs().max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="qft-demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=110)
    p.add_argument("--qat-start", type=int, default=None, help="optimizer step at which the grid is solved and "
                                                               "the fit goes on on it (default: --steps, the "
                                                               "fit's end: no step trains on the grid)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--group-size", type=int, default=64, help="64 divides SmolLM2's 576 and 1536 (128 does not)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=64)
    p.add_argument("--wikitext", default=None, help=f"WikiText-2 test file (default {WIKITEXT}, if present)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<time>; must not exist)")
    p.add_argument("--verbose", action="store_true", help="keep the library lines qft silences (qft.console)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    if args.qat_start is None:
        args.qat_start = args.steps
    if not 0 <= args.qat_start <= args.steps:
        p.error(f"--qat-start {args.qat_start}: must be in [0, --steps={args.steps}]; the default, --steps, "
                "solves the grid once the adapters have trained")
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise FileExistsError(f"--out {str(out)!r} already exists; qft never overwrites a result. Pick another.")
    wiki_path = Path(args.wikitext or os.environ.get("QFT_WIKITEXT", WIKITEXT))

    import pytorch_lightning as pl

    from . import models
    from .console import quiet
    from .export import calibration_mix, load_quantized
    from .export.calibration import GENERAL_FRACTION, model_max_length
    from .export.config import GPTQConfig
    from .export.pipeline import export
    from .export.verify import ExportCheckError
    from .layers import fake_quant_disabled
    from .qat import GridSolve

    quiet(args.verbose)
    t_start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    tok = models.load_tokenizer(args.model)
    wiki_eval, wiki_calib = wikitext(tok, wiki_path)
    general = str(wiki_path) if wiki_calib is not None else None
    init = GridSolve(general_calibration=general, general_start=0.5, general_fraction=GENERAL_FRACTION,
                     n_samples=args.calib_samples, seq_len=args.calib_len)
    if general is None:
        print(f"(no general text at {wiki_path}: the grid is solved on the task alone, so the base's general "
              "ability is not protected and no WikiText-2 perplexity is measured)", flush=True)

    on_grid = args.steps - args.qat_start
    when = "at the fit's end" if not on_grid else f"at step {args.qat_start} (then {on_grid} step(s) train on it)"
    print(f"[1/4] quantization-aware QLoRA: NF4 + PRILoRA, {args.steps} steps of {args.batch_size}; {when} GPTQ "
          f"solves the int4 g{args.group_size} grid of the merged weights "
          f"({'task + general text, general windows anchored to the base' if general else 'task windows'}), and "
          "the fit ends on it; the export writes that grid as it is ...", flush=True)
    qft_dir, hf_dir = out / "qft-int4", out / "hf-recipe-int4"
    t_fit = time.perf_counter()
    module, data, callbacks = qa_qlora(args.model, args.steps, args.batch_size, args.lr, 100, args.qat_start,
                                       args.group_size, out, export_dir=qft_dir, init=init, qat_grid="keep",
                                       calib_samples=args.calib_samples, calib_len=args.calib_len)
    fit_s = time.perf_counter() - t_fit
    qft_summary = next(cb for cb in callbacks if hasattr(cb, "checkpoint_path")).summary
    solved = next(cb for cb in callbacks if hasattr(cb, "solved")).solved

    print("[2/4] Hugging Face's recipe from the same adapters: merge into the original fp base, GPTQ int4 ...",
          flush=True)
    calib = calibration_mix(data, wiki_calib, tok, args.calib_samples, args.calib_len, GENERAL_FRACTION,
                            max_length=model_max_length(module.model))
    try:
        hf_summary = export(module.model, tok, calib, hf_dir, GPTQConfig(bits=4, group_size=args.group_size),
                            base_name=args.model, merge_into="original", qat_grid="resolve", progress=False)
    except ExportCheckError as e:  # the recipe's checkpoint failed the check before the rename: nothing written
        hf_summary = {"refused": str(e)}
        print(f"    refused: {e}", flush=True)

    print("[3/4] the fine-tuned model: its QLoRA adapters on NF4 (fake-quant off), and as trained (on) ...",
          flush=True)
    rows = {}
    with fake_quant_disabled(module.model):
        rows["qlora"] = row(module.model, tok, wiki_eval)
    rows["trained"] = row(module.model, tok, wiki_eval)

    print("[4/4] the exported checkpoints, run in pure torch ...", flush=True)
    exports = {}
    for road, path, summary in (("hf_recipe", hf_dir, hf_summary), ("qft", qft_dir, qft_summary)):
        if "refused" in summary:
            rows[road] = {"acc_1000": None, "acc_1000_se": None, "wikitext_ppl": None}
            exports[road] = {"path": None, "bytes": None, "export_s": None, "refused": summary["refused"]}
            continue
        q = load_quantized(path)  # as a user loads it: the dtype the checkpoint declares
        rows[road] = row(q, tok, wiki_eval)
        del q
        exports[road] = {"path": str(path.resolve()), "bytes": _size(path), "export_s": round(summary["seconds"], 1),
                         "merge_into": summary["merge_into"], "qat_grid": summary["qat_grid"],
                         "general_target": summary["general_target"]}
    exports["qft"].update(matches_trained(module.model, qft_dir, module.model.config.vocab_size))

    summary = {"model": args.model, "rows": rows, "exports": exports, "steps": args.steps,
               "qat_start": args.qat_start, "group_size": args.group_size, "grid_solve": solved,
               "calibration": "task+wikitext" if general else "task",
               "general_ability_protected": general is not None, "fit_s": round(fit_s, 1),
               "adapter_dir": module.adapter_dir, "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary, out)
    return summary


ROW_NAMES = {"qlora": "QLoRA NF4 + PRILoRA adapters", "trained": "  as trained (fake-quant on)",
             "hf_recipe": "int4: Hugging Face's recipe", "qft": "int4: qft (the grid as trained)"}


def _print_table(s: dict, out: Path) -> None:
    ppl = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print()
    print(f"{'model':<34}{'acc (1000)':>14}{'WikiText-2 ppl':>16}{'on disk':>12}")
    for key, name in ROW_NAMES.items():
        r = s["rows"][key]
        size = s["exports"][key]["bytes"] if key in s["exports"] else None
        if r["acc_1000"] is None:
            print(f"{name:<34}{'refused by the export check (nothing written)':>42}")
            continue
        acc = f"{r['acc_1000']:.1%} ±{r['acc_1000_se']:.1%}"
        print(f"{name:<34}{acc:>14}{ppl(r['wikitext_ppl']):>16}{'-' if size is None else f'{size / 2**20:.1f} MB':>12}")
    q = s["exports"]["qft"]
    same = "bit for bit" if q["matches_trained"] else f"NOT bit for bit (max logit diff {q['max_logit_diff']:.2e})"
    on_grid = s["steps"] - s["qat_start"]
    when = "at the fit's end" if not on_grid else f"at step {s['qat_start']} of {s['steps']}, then trained on"
    print(f"\n(hf recipe: merge into the original fp weights + GPTQ, {s['calibration']} calibration; qft: the grid "
          f"solved {when}, written as is: the checkpoint is the model as trained, {same})")
    if not s["general_ability_protected"]:
        print("(no general text: general ability was not protected)")
    print(f"fit {s['fit_s']:.0f} s, total {s['seconds']:.0f} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
