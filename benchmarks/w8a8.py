"""W8A8 int8 post-training quantization of SmolLM2-135M, side by side in one run (issue 16).

    python benchmarks/w8a8.py --out F.json [--alpha 0.8] [--n-samples 128] [--seq-len 512] [--skip-anchor]

Protocol (``gptq_vs_gptqmodel.py``'s, shared/data/README.md): ``../shared/data/wikitext2_test.raw`` is
tokenised whole; perplexity on its first 16 windows of 1024 tokens; the 128 x 512 calibration tokens come
from its second half. Every row quantizes the released SmolLM2 (fp32 weights, bf16 compute) in its own
subprocess (so its peak RSS is its own), writes a compressed-tensors checkpoint, and is evaluated by
reading that file back (``qft.ptq.load_w8a8``, the int8 kernel path): the figures are the artefact's.

Rows: ``fp`` (the bf16 model), ``dynamic`` (RTN weights, per-token int8 inputs, no calibration at all),
``dynamic_smoothquant`` (+ SmoothQuant alpha), ``static`` (RTN, one
calibrated scale per layer input), ``static_smoothquant`` (+ SmoothQuant alpha), ``gptq_w8a8`` (dynamic,
GPTQ weights) and ``smoothquant_gptq_w8a8`` (dynamic, SmoothQuant + GPTQ: the shape of llm-compressor's
W8A8 recipe). ``calibration_s`` is the ``quantize_w8a8`` call. Anchor: llm-compressor's W8A8 recipe
(``SmoothQuantModifier(smoothing_strength=alpha)`` + ``GPTQModifier(scheme="W8A8", ignore=["lm_head"])``,
``oneshot`` on the same tokens) in the repository's ``.venv-llmc`` (``make llmcompressor``), evaluated by
the same reader; null with the reason when that venv is missing or the run fails.

Speed (``speed``): what int8 buys on this CPU for the dynamic path. Per SmolLM2 linear shape and batch of
tokens M: bf16 ``F.linear`` against ``W8A8Linear`` with ``torch._int_mm`` (per-token quantization of the
input included) and against its fp32 reference path; and whole-model tokens/s, bf16 vs W8A8, for a
512-token prefill and for greedy decoding (KV cache, 32 new tokens after a 16-token prompt).
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
LLMC = ROOT / ".venv-llmc" / "bin" / "python"

ROWS = {  # name: W8A8Config fields (alpha filled in from --alpha)
    "dynamic": dict(),
    "dynamic_smoothquant": dict(smoothquant="alpha"),
    "static": dict(activation="static"),
    "static_smoothquant": dict(activation="static", smoothquant="alpha"),
    "gptq_w8a8": dict(weight_method="gptq"),
    "smoothquant_gptq_w8a8": dict(weight_method="gptq", smoothquant="alpha"),
}


def vm_hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- workers (each in its own process) --------------------------------------------------------------
def worker_qft(a) -> dict:
    from qft.models import load
    from qft.ptq import W8A8Config, quantize_w8a8, save_w8a8

    fields = {k: (a.alpha if v == "alpha" else v) for k, v in ROWS[a.row].items()}
    cfg = W8A8Config(**fields)
    model, tok = load("smollm2-135m", dtype=torch.float32)
    calib = torch.load(a.tokens)
    t0 = time.perf_counter()
    summary = quantize_w8a8(model, cfg, calib, batch_size=16, progress=False, compute_dtype=torch.bfloat16)
    secs = time.perf_counter() - t0
    save_w8a8(model, a.save, cfg, tokenizer=tok, dtype=torch.bfloat16)
    return {"calibration_s": secs, "peak_rss_mb": vm_hwm_mb(), "config": cfg.to_dict(),
            "steps_s": {k: summary[k] for k in ("smooth_s", "weights_s", "activations_s") if k in summary}}


def worker_llmc(a) -> dict:
    """llm-compressor's W8A8 recipe (runs in .venv-llmc)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = torch.load(a.tokens)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = [SmoothQuantModifier(smoothing_strength=a.alpha),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    secs = time.perf_counter() - t0
    model.save_pretrained(a.save, save_compressed=True)
    AutoTokenizer.from_pretrained(a.model_dir).save_pretrained(a.save)
    import llmcompressor

    return {"calibration_s": secs, "peak_rss_mb": vm_hwm_mb(), "version": llmcompressor.__version__,
            "recipe": f"SmoothQuantModifier(smoothing_strength={a.alpha}) + GPTQModifier(scheme='W8A8')"}


def run_worker(python, kind, row, tok_file, workdir, alpha, model_dir) -> tuple[dict | None, Path, str]:
    save = workdir / row
    cmd = [str(python), __file__, "--worker", kind, "--row", row, "--tokens", str(tok_file), "--save", str(save),
           "--alpha", str(alpha), "--model-dir", str(model_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        return None, save, r.stderr[-1500:]
    return json.loads(r.stdout.strip().splitlines()[-1]), save, ""


# ---- evaluation and speed ---------------------------------------------------------------------------
def ppl(model, ev) -> float:
    from qft.evaluate import perplexity

    return perplexity(model, ev.flatten(), seq_len=ev.shape[1], batch_size=4)


def _time(f, reps: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def speed(fp_model, q_model) -> dict:
    from qft.ptq.layer import W8A8Linear

    out = {"linear": [], "model": {}}
    g = torch.Generator().manual_seed(0)
    for k, n in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
        w = torch.randn(n, k, generator=g) * 0.02
        scale = w.abs().amax(1, keepdim=True) / 127.5
        lin = W8A8Linear(torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8), scale, int8_kernel=True)
        ref = W8A8Linear(lin.weight, scale, int8_kernel=False)
        wb = w.to(torch.bfloat16)
        for m in (1, 16, 512):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            reps = 200 if m < 512 else 30
            t_bf16 = _time(lambda: torch.nn.functional.linear(x, wb), reps)
            t_int8 = _time(lambda: lin(x), reps)
            t_ref = _time(lambda: ref(x), reps)
            out["linear"].append({"in": k, "out": n, "tokens": m, "bf16_us": t_bf16 * 1e6, "int8_us": t_int8 * 1e6,
                                  "fp32_reference_us": t_ref * 1e6, "bf16_over_int8": t_bf16 / t_int8})
    prompt = torch.randint(100, 20000, (1, 512), generator=g)
    for name, model in (("bf16", fp_model), ("w8a8_int8", q_model)):
        t = _time(lambda: model(input_ids=prompt, use_cache=False), 3)
        short = prompt[:, :16]
        t0 = time.perf_counter()
        model.generate(short, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        dec = time.perf_counter() - t0
        out["model"][name] = {"prefill_tokens_per_s": 512 / t, "decode_tokens_per_s": 32 / dec}
    out["model"]["prefill_ratio_w8a8_over_bf16"] = (out["model"]["w8a8_int8"]["prefill_tokens_per_s"]
                                                    / out["model"]["bf16"]["prefill_tokens_per_s"])
    out["model"]["decode_ratio_w8a8_over_bf16"] = (out["model"]["w8a8_int8"]["decode_tokens_per_s"]
                                                   / out["model"]["bf16"]["decode_tokens_per_s"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--alpha", type=float, default=0.8,
                    help="SmoothQuant migration strength, qft and anchor (0.8: llm-compressor's W8A8 example)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--keep", help="directory to keep the checkpoints in")
    ap.add_argument("--worker", choices=["qft", "llmc"])
    ap.add_argument("--row", choices=[*ROWS, "anchor"])
    ap.add_argument("--tokens")
    ap.add_argument("--save")
    ap.add_argument("--model-dir", help="the converted SmolLM2 directory (workers; llm-compressor's venv has no qft)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker_qft(a) if a.worker == "qft" else worker_llmc(a)))
        return
    if not a.out:
        ap.error("--out F.json is required")
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")
    from gptq_vs_gptqmodel import tokens

    from qft.models import load, local_dir
    from qft.ptq import load_w8a8

    model_dir = local_dir("smollm2-135m")
    t_start = time.perf_counter()
    ev, calib = tokens("smollm2-135m", a.n_samples, a.seq_len, a.eval_windows, a.eval_len)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="w8a8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_file = work / "calib.pt"
    torch.save(calib, tok_file)
    res = {"command": " ".join(sys.argv), "machine": os.uname().nodename, "cpu_threads": torch.get_num_threads(),
           "calibration": list(calib.shape), "eval": [a.eval_windows, a.eval_len], "alpha": a.alpha, "rows": {}}
    fp_model, _ = load("smollm2-135m", dtype=torch.bfloat16)
    fp_model.eval()
    res["fp_ppl"] = ppl(fp_model, ev)
    print(f"fp ppl {res['fp_ppl']:.3f}", flush=True)
    q_for_speed = None
    for row in a.rows:
        info, save, err = run_worker(sys.executable, "qft", row, tok_file, work, a.alpha, model_dir)
        if info is None:
            res["rows"][row] = {"error": err}
            print(f"{row}: FAILED\n{err}", flush=True)
            continue
        model = load_w8a8(save, dtype=torch.bfloat16, int8_kernel=True)
        info["ppl"] = ppl(model, ev)
        info["ppl_over_fp"] = info["ppl"] / res["fp_ppl"]
        res["rows"][row] = info
        res[f"{row}_ppl"] = info["ppl"]
        print(f"{row}: ppl {info['ppl']:.3f} ({info['ppl_over_fp']:.4f}x fp)  {info['calibration_s']:.1f} s  "
              f"rss {info['peak_rss_mb']:.0f} MB", flush=True)
        if row == "dynamic":
            q_for_speed = model
        else:
            del model
    res["anchor"] = None
    if a.skip_anchor:
        res["anchor_skipped"] = "--skip-anchor"
    elif not LLMC.exists():
        res["anchor_skipped"] = f"{LLMC} not found (make llmcompressor)"
    else:
        info, save, err = run_worker(LLMC, "llmc", "anchor", tok_file, work, a.alpha, model_dir)
        if info is None:
            res["anchor_skipped"] = "llm-compressor failed: " + err
        else:
            model = load_w8a8(save, dtype=torch.bfloat16, int8_kernel=True)
            info["ppl"] = ppl(model, ev)
            res["anchor"] = {"name": f"llm-compressor {info['version']}", **info}
            del model
            print(f"anchor (llm-compressor): ppl {info['ppl']:.3f}  {info['calibration_s']:.1f} s  "
                  f"rss {info['peak_rss_mb']:.0f} MB", flush=True)
    res["static_smoothquant_ppl"] = res.get("static_smoothquant_ppl")
    if not a.skip_speed and q_for_speed is not None:
        res["speed"] = speed(fp_model, q_for_speed)
        m = res["speed"]["model"]
        print(f"prefill tokens/s bf16 {m['bf16']['prefill_tokens_per_s']:.0f} w8a8 "
              f"{m['w8a8_int8']['prefill_tokens_per_s']:.0f}; decode bf16 {m['bf16']['decode_tokens_per_s']:.1f} "
              f"w8a8 {m['w8a8_int8']['decode_tokens_per_s']:.1f}", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    from result_file import write_result

    write_result(a.out, res, replace=a.force)


if __name__ == "__main__":
    main()
