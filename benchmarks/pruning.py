"""Pruning SmolLM2-135M: magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, alone and with int4
in one pass, side by side in one run (issue 13).

    python benchmarks/pruning.py --out F.json [--n-samples 128] [--seq-len 512] [--skip-speed]

Protocol (``gptq_vs_gptqmodel.py``'s, shared/data/README.md): ``../shared/data/wikitext2_test.raw`` is
tokenised whole; perplexity on its first 16 windows of 1024 tokens; 128 x 512 calibration tokens from its
second half. Every row prunes the released SmolLM2 (bf16 compute) in its own subprocess, one after
another, through the export (``quantize_model`` with ``GPTQConfig(sparsity=...)``), writes the
checkpoint, and is evaluated by reading it back (``qft.export.load_quantized``).

Rows: ``magnitude``, ``wanda``, ``sparsegpt`` (``method="none"``: pruned, weights in floating point) and
``sparsegpt_int4`` (``method="gptq"``: SparseGPT and GPTQ int4 g64 in one pass), for ``unstructured50``
and ``2of4``; ``gptq`` (dense int4 g64) gives ``gptq_s``, the time the joint pass is compared with.

Recovery (``recovered``): each floating-point pruned checkpoint is fine-tuned in full for
``--recover-steps`` steps of ``--batch`` x 512 calibration tokens (AdamW, ``--lr``, bf16 autocast) with
its zeros kept (``qft.sparsity.protect_zeros``: the loaded checkpoint records ``sparsity_config``), and
re-evaluated; the recovered SparseGPT model is then exported as GPTQ int4 g64 with its zeros held
(``sparsegpt_then_int4``).

Speed (``speed``): what sparsity buys on this CPU for SmolLM2's linear shapes: dense ``F.linear`` against
``torch.sparse`` CSR at 50% (and 2:4 semi-structured where this build supports it on the CPU).
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
GROUP = 64
PATTERNS = {"unstructured50": "unstructured", "2of4": "2:4"}
ROWS = {"magnitude": dict(method="none", prune_method="magnitude"),
        "wanda": dict(method="none", prune_method="wanda"),
        "sparsegpt": dict(method="none", prune_method="sparsegpt"),
        "sparsegpt_int4": dict(method="gptq", prune_method="sparsegpt")}


def _cfg(row: str, pattern: str | None):
    from qft.export import GPTQConfig

    if row == "gptq":
        return GPTQConfig(bits=4, group_size=GROUP)
    return GPTQConfig(bits=4, group_size=GROUP, sparsity=0.5, sparsity_pattern=PATTERNS[pattern], **ROWS[row])


def worker(a) -> dict:
    from gptq_vs_gptqmodel import rss_mb

    from qft.export import quantize_model, save_quantized
    from qft.models import load

    model, tok = load("smollm2-135m", dtype=torch.bfloat16)
    calib = torch.load(a.tokens)
    cfg = _cfg(a.row, a.pattern)
    t0 = time.perf_counter()
    quantized, rows = quantize_model(model, cfg, calib, batch_size=16, progress=False)
    secs = time.perf_counter() - t0
    save_quantized(model, quantized, cfg, a.save, tokenizer=tok, report_rows=rows)
    sp = [r["sparsity"] for r in rows if "sparsity" in r]
    return {"s": secs, "peak_rss_mb": rss_mb(), "config": cfg.to_dict(),
            "layer_sparsity_mean": sum(sp) / len(sp) if sp else 0.0}


def recover_worker(a) -> dict:
    """Full fine-tune of the pruned checkpoint ``a.save`` with its zeros kept (``qft.sparsity``), written to
    ``a.save + "-recovered"``; with ``--then-int4`` the recovered model is also exported as GPTQ int4 g64,
    the zeros held as a fixed mask (``keep_zeros``)."""
    from gptq_vs_gptqmodel import rss_mb

    from qft import sparsity
    from qft.export import GPTQConfig, quantize_model, save_quantized
    from qft.export.checkpoint import CheckpointWriter, plain_tensors
    from qft.models import load_model, load_tokenizer

    model = load_model(a.save, dtype=torch.float32)
    assert sparsity.is_sparse(model), "not a pruned checkpoint"
    before = sparsity.zero_fraction(model)
    sparsity.protect_zeros(model)
    data = torch.load(a.tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(a.steps):
        rows = torch.arange(step * a.batch, (step + 1) * a.batch) % len(data)
        b = data[rows]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    secs = time.perf_counter() - t0
    model.eval()
    out = {"recover_s": secs, "steps": a.steps, "batch": a.batch, "lr": a.lr, "first_loss": losses[0],
           "last_loss": sum(losses[-8:]) / min(8, len(losses)), "zeros_before": before,
           "zeros_after": sparsity.zero_fraction(model)}
    dest = Path(a.save + "-recovered")
    writer = CheckpointWriter(dest, overwrite=True)
    writer.add(plain_tensors(model, set(), torch.bfloat16))
    writer.finish(model, None, torch.bfloat16, load_tokenizer("smollm2-135m"))
    if a.then_int4:
        model = model.to(torch.bfloat16)
        cfg = GPTQConfig(bits=4, group_size=GROUP)
        calib = torch.load(a.tokens)
        quantized, rows = quantize_model(model, cfg, calib, batch_size=16, progress=False, keep_zeros=True)
        save_quantized(model, quantized, cfg, a.save + "-recovered-int4", tokenizer=load_tokenizer("smollm2-135m"),
                       report_rows=rows)
        deq = [q.dequantize() for q in quantized.values()]
        out["int4_zeros"] = sum(int((w == 0).sum()) for w in deq) / sum(w.numel() for w in deq)
    out["peak_rss_mb"] = rss_mb()
    return out


def run_worker(row, pattern, tok_file, work, recover: dict | None = None):
    save = work / f"{row}-{pattern}"
    cmd = [sys.executable, __file__, "--worker", "--row", row, "--pattern", str(pattern), "--tokens", str(tok_file),
           "--save", str(save)]
    if recover is not None:
        cmd += ["--recover", "--steps", str(recover["steps"]), "--batch", str(recover["batch"]),
                "--lr", str(recover["lr"]), *(["--then-int4"] if recover.get("then_int4") else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        return None, save, (r.stdout + r.stderr)[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), save, ""


def _time(f, reps: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


@torch.inference_mode()
def speed() -> dict:
    """Microseconds per call, dense against sparse, for SmolLM2's linear shapes (fp32; CSR has no bf16 matmul
    on the CPU in every build)."""
    import torch.nn.functional as F

    from qft.export.prune import magnitude_mask

    out = {"shapes": []}
    g = torch.Generator().manual_seed(0)
    for in_f, out_f in ((576, 576), (576, 1536), (1536, 576)):
        W = torch.randn(out_f, in_f, generator=g)
        for tokens in (1, 512):
            x = torch.randn(tokens, in_f, generator=g)
            row = {"in": in_f, "out": out_f, "tokens": tokens, "dense_us": _time(lambda: F.linear(x, W))}
            Wu = W.masked_fill(magnitude_mask(W, 0.5), 0)
            csr = Wu.to_sparse_csr()
            row["csr50_us"] = _time(lambda: torch.sparse.mm(csr, x.t()))
            try:
                from torch.sparse import to_sparse_semi_structured

                W24 = W.masked_fill(magnitude_mask(W, 0.5, "2:4"), 0)
                ss = to_sparse_semi_structured(W24.half())
                row["semi_structured_2of4_us"] = _time(lambda: torch.mm(ss, x.t().half()))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                row["semi_structured_2of4"] = f"unavailable on this CPU build: {type(e).__name__}: {str(e)[:120]}"
            row["dense_over_csr"] = row["dense_us"] / row["csr50_us"]
            out["shapes"].append(row)
            print(json.dumps(row), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--keep", help="directory to keep the checkpoints in")
    ap.add_argument("--recover-steps", type=int, default=48, help="recovery fine-tune steps (0: skip recovery)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--recover", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--then-int4", action="store_true")
    ap.add_argument("--row")
    ap.add_argument("--pattern")
    ap.add_argument("--tokens")
    ap.add_argument("--save")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(recover_worker(a) if a.recover else worker(a)))
        return
    if not a.out:
        ap.error("--out F.json is required")
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")
    from gptq_vs_gptqmodel import perplexity, tokens

    from qft.export import load_quantized
    from qft.models import load

    ev, calib = tokens("smollm2-135m", a.n_samples, a.seq_len, a.eval_windows, a.eval_len)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="prune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_file = work / "calib.pt"
    torch.save(calib, tok_file)
    res = {"command": " ".join(sys.argv), "machine": os.uname().nodename, "cpu_threads": torch.get_num_threads(),
           "calibration": list(calib.shape), "eval": [a.eval_windows, a.eval_len], "rows": {}}
    dense, _ = load("smollm2-135m", dtype=torch.bfloat16)
    res["dense_ppl"] = perplexity(dense.eval(), ev)
    del dense
    print(f"dense ppl {res['dense_ppl']:.3f}", flush=True)
    jobs = [("gptq", None)] + [(r, p) for p in a.patterns for r in ROWS]
    for row, pattern in jobs:
        info, save, err = run_worker(row, pattern, tok_file, work)
        key = row if pattern is None else f"{pattern}/{row}"
        if info is None:
            print(f"{key}: FAILED\n{err}", flush=True)
            res["rows"][key] = {"error": err}
            continue
        info["ppl"] = perplexity(load_quantized(save, dtype=torch.bfloat16), ev)
        res["rows"][key] = info
        print(f"{key}: ppl {info['ppl']:.3f}  {info['s']:.1f} s  rss {info['peak_rss_mb']:.0f} MB  "
              f"sparsity {info['layer_sparsity_mean']:.3f}", flush=True)
        if pattern is None:
            res["gptq_ppl"], res["gptq_s"] = info["ppl"], info["s"]
        else:
            res.setdefault(pattern, {})[row] = info["ppl"]
            if row == "sparsegpt_int4" and pattern == "unstructured50":
                res["sparsegpt_int4_s"] = info["s"]
    if a.recover_steps:
        rec = dict(steps=a.recover_steps, batch=a.batch, lr=a.lr)
        for pattern in a.patterns:
            for row in ("magnitude", "wanda", "sparsegpt"):
                key = f"{pattern}/{row}"
                if "ppl" not in res["rows"].get(key, {}):
                    continue
                info, save, err = run_worker(row, pattern, tok_file, work,
                                             {**rec, "then_int4": row == "sparsegpt"})
                if info is None:
                    print(f"{key} recovery: FAILED\n{err}", flush=True)
                    res["rows"][key]["recovery"] = {"error": err}
                    continue
                info["ppl"] = perplexity(load_quantized(f"{save}-recovered", dtype=torch.bfloat16), ev)
                res.setdefault("recovered", {}).setdefault(pattern, {})[row] = info["ppl"]
                if row == "sparsegpt":
                    info["int4_ppl"] = perplexity(load_quantized(f"{save}-recovered-int4", dtype=torch.bfloat16), ev)
                    res["recovered"][pattern]["sparsegpt_then_int4"] = info["int4_ppl"]
                res["rows"][key]["recovery"] = info
                print(f"{key} recovered: ppl {info['ppl']:.3f} (from {res['rows'][key]['ppl']:.3f})  "
                      f"{info['recover_s']:.0f} s  zeros {info['zeros_before']:.3f} -> {info['zeros_after']:.3f}"
                      + (f"  then int4 {info['int4_ppl']:.3f} (zeros {info['int4_zeros']:.3f})"
                         if "int4_ppl" in info else ""), flush=True)
    if "gptq_s" in res and "sparsegpt_int4_s" in res:
        res["sparsegpt_int4_time_over_gptq"] = res["sparsegpt_int4_s"] / res["gptq_s"]
    if not a.skip_speed:
        res["speed"] = speed()
    from result_file import write_result

    write_result(a.out, res, replace=a.force)
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "speed")}, indent=2))


if __name__ == "__main__":
    main()
