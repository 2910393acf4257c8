"""AWQ on SmolLM2-135M, int4 g64 with zero points, side by side in one run (issue 13).

    python benchmarks/awq.py --out F.json [--n-samples 128] [--seq-len 512] [--skip-anchor]

Protocol (``gptq_vs_gptqmodel.py``'s, shared/data/README.md): ``../shared/data/wikitext2_test.raw`` is
tokenised whole; perplexity on its first 16 windows of 1024 tokens; 128 x 512 calibration tokens from its
second half. Every row quantizes the released SmolLM2 (bf16) in its own subprocess, one after another
(never two at once), writes its checkpoint, and is evaluated by reading that file back with
``qft.export.load_quantized`` (GPTQ and AWQ files alike), so both sides are measured by one reader.

Rows (all int4, group 64, asymmetric: AWQ's ``zero_point=True`` grid): ``rtn``, ``gptq``, ``awq``
(``method="awq"``: scale search + clipping + rounding, an AWQ GEMM checkpoint) and ``awq_gptq`` (AWQ's
scales, then GPTQ, a GPTQ checkpoint). ``s`` is the quantization call. Anchor: GPTQModel's AWQ
(``QuantizeConfig(quant_method=AWQ, format=GEMM, bits=4, group_size=64, sym=False)``, its defaults
otherwise, ``GPTQMODEL_CPU_WORKERS=2``) in the repository's ``.venv-interop`` (``make interop``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
INTEROP = ROOT / ".venv-interop" / "bin" / "python"
ROWS = ("rtn", "gptq", "awq", "awq_gptq")
GROUP = 64


def worker_qft(a) -> dict:
    from gptq_vs_gptqmodel import rss_mb

    from qft.export import GPTQConfig, quantize_model, save_quantized
    from qft.models import load

    model, tok = load("smollm2-135m", dtype=torch.bfloat16)
    calib = torch.load(a.tokens)
    cfg = GPTQConfig(bits=4, group_size=GROUP, sym=False, method=a.row)
    t0 = time.perf_counter()
    quantized, rows = quantize_model(model, cfg, calib, batch_size=16, progress=False)
    secs = time.perf_counter() - t0
    save_quantized(model, quantized, cfg, a.save, tokenizer=tok, report_rows=rows)
    alphas = [r["awq_alpha"] for r in rows if r.get("awq_alpha") is not None]
    return {"s": secs, "peak_rss_mb": rss_mb(), "config": cfg.to_dict(),
            "awq_alpha_mean": sum(alphas) / len(alphas) if alphas else None,
            "awq_unscaled_layers": sum(1 for r in rows if r.get("awq_fold_refused"))}


def worker_gptqmodel(a) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    from gptq_vs_gptqmodel import rss_mb
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    from qft.models import smollm2_path

    calib = torch.load(a.tokens)
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in calib]
    qc = QuantizeConfig(bits=4, group_size=GROUP, sym=False, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
    model = GPTQModel.load(str(smollm2_path()), qc, dtype=torch.bfloat16, device="cpu")
    t0 = time.perf_counter()
    model.quantize(data)
    secs = time.perf_counter() - t0
    model.save(a.save)
    return {"s": secs, "peak_rss_mb": rss_mb(), "version": gptqmodel.__version__,
            "config": "QuantizeConfig(bits=4, group_size=64, sym=False, quant_method=AWQ, format=GEMM)"}


def run_worker(python, kind, row, tok_file, work) -> tuple[dict | None, Path, str]:
    save = work / row
    cmd = [str(python), __file__, "--worker", kind, "--row", row, "--tokens", str(tok_file), "--save", str(save)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", GPTQMODEL_CPU_WORKERS="2")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None, save, (r.stdout + r.stderr)[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["wall_s"] = time.perf_counter() - t0
    return info, save, ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--keep", help="directory to keep the checkpoints in")
    ap.add_argument("--worker", choices=["qft", "gptqmodel"])
    ap.add_argument("--row")
    ap.add_argument("--tokens")
    ap.add_argument("--save")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker_qft(a) if a.worker == "qft" else worker_gptqmodel(a)))
        return
    if not a.out:
        ap.error("--out F.json is required")
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")
    from gptq_vs_gptqmodel import perplexity, tokens

    from qft.export import load_quantized
    from qft.models import load

    ev, calib = tokens("smollm2-135m", a.n_samples, a.seq_len, a.eval_windows, a.eval_len)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="awq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_file = work / "calib.pt"
    torch.save(calib, tok_file)
    res = {"command": " ".join(sys.argv), "machine": os.uname().nodename, "cpu_threads": torch.get_num_threads(),
           "calibration": list(calib.shape), "eval": [a.eval_windows, a.eval_len], "grid": "int4 g64 asymmetric",
           "rows": {}}
    fp, _ = load("smollm2-135m", dtype=torch.bfloat16)
    res["fp_ppl"] = perplexity(fp.eval(), ev)
    del fp
    print(f"fp ppl {res['fp_ppl']:.3f}", flush=True)
    jobs = [("qft", sys.executable, r) for r in a.rows]
    if a.skip_anchor:
        res["anchor"], res["anchor_skipped"] = None, "--skip-anchor"
    elif not INTEROP.exists():
        res["anchor"], res["anchor_skipped"] = None, f"{INTEROP} not found (make interop)"
    else:
        jobs.append(("gptqmodel", INTEROP, "anchor"))
    for kind, python, row in jobs:
        info, save, err = run_worker(python, kind, row, tok_file, work)
        if info is None:
            print(f"{row}: FAILED\n{err}", flush=True)
            res["rows"][row] = {"error": err}
            if row == "anchor":
                res["anchor"] = None
            continue
        info["ppl"] = perplexity(load_quantized(save, dtype=torch.bfloat16), ev)
        info["ppl_over_fp"] = info["ppl"] / res["fp_ppl"]
        res["rows"][row] = info
        print(f"{row}: ppl {info['ppl']:.3f} ({info['ppl_over_fp']:.4f}x fp)  {info['s']:.1f} s  "
              f"rss {info['peak_rss_mb']:.0f} MB", flush=True)
        if row == "anchor":
            res["anchor"] = {"name": f"GPTQModel {info['version']} AWQ", "ppl": info["ppl"], "s": info["s"]}
        else:
            res[f"{row}_ppl"] = info["ppl"]
    if "awq" in res["rows"] and "s" in res["rows"]["awq"]:
        res["awq_s"] = res["rows"]["awq"]["s"]
    if res.get("anchor") and "awq_ppl" in res:
        res["awq_ppl_over_anchor"] = res["awq_ppl"] / res["anchor"]["ppl"]
        res["awq_time_over_anchor"] = res["awq_s"] / res["anchor"]["s"]
    from result_file import write_result

    write_result(a.out, res, replace=a.force)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
