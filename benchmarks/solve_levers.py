"""Which settings of the grid solve keep the most of the main job's task and general text.

    python benchmarks/solve_levers.py --out benchmarks/results/solve_levers.json [--steps 110] \
        [--arms default,mse,frac0.125,n128] [--fit runs/levers-fit]

The demo solves its int4 grid once, at the last step, with the export's anchored GPTQ (``qft.qat.solve``),
and writes that grid as it is. So the solve's own settings decide what ships. This benchmark fits the
demo's recipe once (NF4 + PRILoRA QLoRA, ``qft.demo.qa_qlora`` without QAT; kept in ``--fit`` and
reused when it is already there), then solves the merged model in memory once per arm and measures each
as the demo measures its rows (``qft.demo.row``: teacher-forced exact match on 1000 held-out problems
with its standard error, WikiText-2 perplexity on the first 16 x 1024 test tokens). It also measures the
adapters on NF4 and Hugging Face's recipe (merge into the fp base, plain GPTQ) from the same fit.

Arms are ``+``-joined settings: ``mse`` (the clipping search), ``fracF`` (general fraction), ``nN``
(calibration windows), ``lenL`` (tokens per window), ``damp0.05``; ``default`` is the demo's solve
(64 x 64 windows, a quarter general, min-max ranges).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_file import write_result  # noqa: E402


def parse_arm(arm: str) -> dict:
    s = {"mse": False, "frac": 0.25, "n": 64, "len": 64, "damp": 0.01}
    for part in arm.split("+"):
        if part == "default":
            continue
        if part == "mse":
            s["mse"] = True
        elif part.startswith("frac"):
            s["frac"] = float(part[4:])
        elif part.startswith("damp"):
            s["damp"] = float(part[4:])
        elif part.startswith("len"):
            s["len"] = int(part[3:])
        elif part.startswith("n") and part[1:].isdigit():
            s["n"] = int(part[1:])
        else:
            raise SystemExit(f"--arms: unknown setting {part!r}; allowed: default, mse, fracF, nN, lenL, dampD")
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--arms", default="default,mse,frac0.125,n128")
    ap.add_argument("--fit", default="runs/levers-fit", help="where the fit is kept (reused if it holds one)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--force", action="store_true", help="replace --out")
    a = ap.parse_args()
    arms = [(arm, parse_arm(arm)) for arm in a.arms.split(",")]  # bad arms fail before any work
    if Path(a.out).exists() and not a.force:
        raise SystemExit(f"--out {a.out} exists; pass --force to replace it")
    torch.set_num_threads(2)

    import pytorch_lightning as pl

    from qft import layers, models
    from qft.console import quiet
    from qft.data import QFTDataModule
    from qft.demo import qa_qlora, row, wikitext
    from qft.export import GPTQConfig, calibration_mix
    from qft.export.merge import merge_adapters
    from qft.export.pipeline import base_weights
    from qft.export.sequential import quantize_model
    from qft.module import CausalLMModule

    quiet(False)
    tok = models.load_tokenizer(a.model)
    wiki_eval, wiki_calib = wikitext(tok)
    if wiki_eval is None:
        raise SystemExit("needs ../shared/data/wikitext2_test.raw")
    res = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
           "steps": a.steps, "rows": []}

    ckpt = sorted(Path(a.fit).glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    t0 = time.perf_counter()
    if ckpt:
        trained = CausalLMModule.load_any(str(ckpt[-1])).model.eval()
    else:
        pl.seed_everything(0, verbose=False)
        module, _, _ = qa_qlora(a.model, a.steps, 16, 2e-3, 100, None, 64, Path(a.fit), progress=True)
        trained = module.model.eval()
    res["fit_s"] = round(time.perf_counter() - t0, 1)
    data = QFTDataModule(task="synthetic", batch_size=16, num_train=a.steps * 16, num_val=100, seq_len=64)
    data.setup("fit")
    anchor = base_weights(a.model)

    def record(name, model, **extra):
        t = time.perf_counter()
        r = {"row": name, **extra, **row(model, tok, wiki_eval)}
        r["eval_s"] = round(time.perf_counter() - t, 1)
        res["rows"].append(r)
        print(r, flush=True)
        write_result(a.out, res, replace=True)

    with layers.fake_quant_disabled(trained):
        record("qlora (adapters on NF4)", trained)
    calib = calibration_mix(data, wiki_calib, tok, 64, 64, 0.25)
    model = merge_adapters(trained, a.model, merge_into="original").to(torch.bfloat16)
    t = time.perf_counter()
    quantize_model(model, GPTQConfig(bits=4, group_size=64), calib, progress=False)
    record("hf_recipe (fp base, plain GPTQ)", model.float(), solve_s=round(time.perf_counter() - t, 1))
    del model
    for arm, s in arms:
        calib = calibration_mix(data, wiki_calib, tok, s["n"], s["len"], s["frac"])
        rows = round(s["n"] * s["frac"])
        model = merge_adapters(trained, a.model, merge_into="trained").to(torch.bfloat16)
        cfg = GPTQConfig(bits=4, group_size=64, mse=s["mse"], damp_percent=s["damp"])
        t = time.perf_counter()
        quantize_model(model, cfg, calib, progress=False, anchor=anchor if rows else None, anchor_rows=rows)
        record(f"qft solve: {arm}", model.float(), settings=s, solve_s=round(time.perf_counter() - t, 1))
        del model
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
