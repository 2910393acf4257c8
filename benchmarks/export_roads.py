"""Every road from one fine-tune to a deployed int4 checkpoint, measured side by side on SmolLM2-135M.

    python benchmarks/export_roads.py --out roads.json [--steps 160] [--qat-start 100] [--num-val 100]

Two fine-tunes of the demo's task (``qft.demo.qa_qlora``: NF4 QLoRA + PRILoRA 4->12, 160 steps x 16):

- ``qa_qlora``: with QAT on the merged weight from ``--qat-start`` (the ``make demo`` recipe);
- ``qlora``: the same without QAT.

For each, every export road is written (int4, group 64) and its checkpoint is run in pure torch for the
task accuracy (exact match on the held-out additions) and WikiText-2 perplexity (first 16 x 1024 tokens
of ``../shared/data/wikitext2_test.raw``). Roads:

- ``original+gptq``: merge into the original fp base, GPTQ (Hugging Face's recipe);
- ``trained+gptq``: merge into the base the adapters trained on (dequantized NF4), GPTQ;
- ``qat_keep``: the grid QAT learned, written as is (``qat_grid="keep"``); QAT run only;
- ``qat_refine``: the learned scales, codes re-solved by GPTQ (``qat_grid="refine"``); QAT run only.

Solves run with ``general_target`` "trained" (plain GPTQ: reproduce the fine-tuned model on every
calibration window) and, with mixed calibration, "base" (reproduce the fine-tune on the task windows and
the released base model on the general-text windows: the anchored least-squares solve of
``qft.export.sequential.quantize_model``).

GPTQ calibrates on ``--calib-samples`` x ``--calib-len`` tokens: the task mixed with WikiText-2 windows
from the second half of its tokens (a quarter or half of the windows), or the task alone (shown for
``original+gptq`` to separate the calibration's share of the WikiText loss). Reference rows locate where
the general-text loss comes from: the base (fp32, and its NF4 rounding), the trained model (fake-quant off
and on), and the merged fp models before any int4 rounding.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# (name, merge_into, qat_grid, general_fraction (None: no calibration, 0: task only), general_target)
ROADS = [("original+gptq", "original", "resolve", 0.0, "trained"),
         ("original+gptq", "original", "resolve", 0.25, "trained"),
         ("original+gptq", "original", "resolve", 0.5, "trained"),
         ("trained+gptq", "trained", "resolve", 0.25, "trained"),
         ("trained+gptq", "trained", "resolve", 0.25, "base"),
         ("trained+gptq", "trained", "resolve", 0.5, "base"),
         ("qat_keep", "trained", "keep", None, "trained"),
         ("qat_refine", "trained", "refine", 0.25, "base"),
         ("qat_refine", "trained", "refine", 0.5, "base")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--qat-start", type=int, default=100)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=64)
    ap.add_argument("--runs", default="qa_qlora,qlora")
    ap.add_argument("--roads", default=",".join(dict.fromkeys(r[0] for r in ROADS)), help="road names to export")
    ap.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the base, the trained model and the fp merges")
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama for a quick check of the script")
    ap.add_argument("--reuse", default=None,
                    help="work directory of an earlier run (printed at its start): export its saved fine-tunes "
                         "instead of fitting again")
    a = ap.parse_args()
    torch.set_num_threads(2)

    import pytorch_lightning as pl

    from qft import models
    from qft.demo import measure, qa_qlora, wikitext
    from qft.export import GPTQConfig, calibration_mix, load_quantized
    from qft.export.merge import merge_adapters
    from qft.export.pipeline import export
    from qft.layers import adapters_disabled, fake_quant_disabled

    tok = models.load_tokenizer(a.model)
    wiki_eval, wiki_calib = wikitext(tok)
    if wiki_eval is None:
        sys.exit("needs ../shared/data/wikitext2_test.raw")
    result = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "torch_threads": torch.get_num_threads(), "rows": []}
    work = Path(a.reuse) if a.reuse else Path(tempfile.mkdtemp(prefix="export-roads-"))
    print(f"work directory: {work}", flush=True)

    def row(run, road, model=None, path=None, **extra):
        t = time.perf_counter()
        m = load_quantized(path, dtype=torch.float32) if path is not None else model
        r = {"run": run, "road": road, **measure(m, tok, a.num_val, wiki_eval), **extra}
        if path is not None:
            r["bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        r["eval_s"] = round(time.perf_counter() - t, 1)
        result["rows"].append(r)
        print(json.dumps(r), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")

    def references(run, trained):
        with fake_quant_disabled(trained):
            if run == "qlora":
                with adapters_disabled(trained):
                    row(run, "nf4 base (adapters off)", trained)
            row(run, "trained (fake-quant off)", trained)
            for merge_into in ("original", "trained"):
                row(run, f"{merge_into} merge, fp32", merge_adapters(trained, a.model, merge_into))
        if run == "qa_qlora":
            row(run, "trained (fake-quant on)", trained)

    wanted = set(a.roads.split(","))
    if a.references:
        base = models.load_model(a.model)
        row("base", "fp32", base)
        del base
    for run in a.runs.split(","):
        pl.seed_everything(0, verbose=False)
        t = time.perf_counter()
        qat_start = a.qat_start if run == "qa_qlora" else None
        saved = sorted((work / run).glob("lightning_logs/version_*/checkpoints/*.ckpt")) if a.reuse else []
        if a.reuse and not saved:
            sys.exit(f"--reuse {work}: no checkpoint of run {run!r} there")
        if saved:
            from qft.data import QFTDataModule
            from qft.module import CausalLMModule

            module = CausalLMModule.load_any(str(saved[-1]))
            data = QFTDataModule(task="synthetic", batch_size=16, num_train=a.steps * 16, num_val=a.num_val, seq_len=64)
            result[f"reused_{run}"] = str(saved[-1])
        else:
            module, data, _ = qa_qlora(a.model, a.steps, 16, 2e-3, a.num_val, qat_start, a.group_size, work / run,
                                       progress=False)
            result[f"fit_s_{run}"] = round(time.perf_counter() - t, 1)
        trained = module.model.eval()
        if a.references:
            references(run, trained)
        cfg = GPTQConfig(bits=4, group_size=a.group_size)
        for road in (r for r in ROADS if r[0] in wanted and (run == "qa_qlora" or r[2] == "resolve")):
            name, merge_into, qat_grid, fraction, target = road
            calib = None
            if fraction is not None:
                calib = calibration_mix(data, wiki_calib if fraction else None, tok, a.calib_samples, a.calib_len,
                                        fraction)
            n_general = round(a.calib_samples * fraction) if fraction else 0
            path = work / run / f"{name}-{fraction}-{target}-{time.strftime('%H%M%S')}"
            s = export(trained, tok, calib, path, cfg, base_name=a.model, merge_into=merge_into, qat_grid=qat_grid,
                       progress=False, general_rows=n_general, general_target=target)
            row(run, name, path=path, general_fraction=fraction, general_target=target,
                export_s=round(s["seconds"], 1), drift_kl=(s.get("export_drift") or {}).get("kl"))
        del module, trained


if __name__ == "__main__":
    main()
