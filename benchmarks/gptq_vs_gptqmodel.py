"""qft's pure-torch GPTQ against GPTQModel on SmolLM2-135M (bf16), WikiText-2, 4-bit symmetric.

    python benchmarks/gptq_vs_gptqmodel.py --out F.json [--groups 128 64] [--n-samples 128] [--seq-len 512]
        [--qft-roads memory layerwise layerwise-no-reuse layerwise-disk] [--skip-gptqmodel]

Setup (issue 6 / shared/data/README.md conventions): the whole of ../shared/data/wikitext2_test.raw is
tokenised; perplexity is measured on the first 16 windows of 1024 tokens; the 128 x 512 calibration
tokens come from the second half (disjoint). Every quantizer writes a GPTQ checkpoint and every
checkpoint is evaluated by the same code (``qft.export.load_quantized``, bf16), so the perplexities
compare the exported artefacts, not each tool's in-memory model.

Each quantizer runs in its own subprocess, so its peak RSS (VmHWM) is its own: qft in this
interpreter, GPTQModel in the interop venv (``--interop-python``, default the repository's
``.venv-interop``, built by ``make interop``; skipped with a note when gptqmodel does not import there),
with its defaults except bits/group/sym and ``GPTQMODEL_CPU_WORKERS=2``. Timed: the quantization call
only (not model load, not save), and ``whole_s`` the load + quantize + save.
``forward_pass_s`` is one plain bf16 forward of the full model over the calibration set, the floor.

qft's roads (``--qft-roads``; rows ``qft``, ``qft_layerwise``, ...): ``memory`` loads the bf16 model and
quantizes it in memory (``quantize_model``); ``layerwise`` is ``qft export --layerwise``'s engine
(``export_layerwise``: the skeleton on the meta device, each block read from safetensors, solved, written
and freed; its ``s`` is the whole call, reading and writing included); ``-no-reuse`` adds
``reuse_outputs=False`` and ``-disk`` ``calibration_offload="disk"``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data" / "wikitext2_test.raw"
INTEROP = str(ROOT / ".venv-interop" / "bin" / "python")
ROADS = {"memory": {}, "layerwise": {}, "layerwise-no-reuse": {"reuse_outputs": False},
         "layerwise-disk": {"calibration_offload": "disk"}}


def rss_mb() -> float:
    """This process's own peak RSS. ru_maxrss survives execve on Linux (a worker would report the parent's
    peak), so read VmHWM, which belongs to the process's own address space."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens(model_name, n_samples, seq_len, eval_windows, eval_len):
    from qft.export.calibration import calibration_tokens
    from qft.models import load_tokenizer

    if not DATA.is_file():
        sys.exit(f"missing {DATA}: the benchmark needs the shared WikiText-2 file")
    tok = load_tokenizer(model_name)
    ids = torch.tensor(tok(DATA.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    ev = ids[: eval_windows * eval_len].reshape(eval_windows, eval_len)
    calib = calibration_tokens(ids[ids.numel() // 2:], n_samples=n_samples, seq_len=seq_len)
    return ev, calib


def perplexity(model, ev, batch=4) -> float:
    """Perplexity over the evaluation windows ``ev`` [n, len] (qft.evaluate's protocol)."""
    from qft.evaluate import perplexity as windows_perplexity

    return windows_perplexity(model, ev.flatten(), seq_len=ev.shape[1], batch_size=batch)


@torch.inference_mode()
def forward_pass_s(model, calib, batch=16) -> float:
    t0 = time.perf_counter()
    for b in calib.split(batch):
        model(input_ids=b, use_cache=False)
    return time.perf_counter() - t0


# ---- workers (run in their own process) -------------------------------------------------------------
def worker_qft(a):
    from qft.export import GPTQConfig, quantize_model, save_quantized
    from qft.models import load

    t_all = time.perf_counter()
    model, tok = load(a.model, dtype=torch.bfloat16)
    calib = torch.load(a.tokens)
    cfg = GPTQConfig(bits=4, group_size=a.group, sym=True, **json.loads(a.qft_args))
    t0 = time.perf_counter()
    quantized, rows = quantize_model(model, cfg, calib, batch_size=16, progress=False)
    secs = time.perf_counter() - t0
    save_quantized(model, quantized, cfg, a.save, tokenizer=tok, report_rows=rows)
    Path(a.result).write_text(json.dumps({"s": secs, "whole_s": time.perf_counter() - t_all,
                                          "peak_rss_mb": rss_mb(), "config": cfg.to_dict()}))


def worker_qft_layerwise(a):
    """``qft export --layerwise``'s engine on the plain model (no adapter), in bf16."""
    from qft.export import GPTQConfig
    from qft.export.layerwise import export_layerwise
    from qft.models import load_tokenizer, local_dir

    t0 = time.perf_counter()
    calib = torch.load(a.tokens)
    cfg = GPTQConfig(bits=4, group_size=a.group, sym=True, **json.loads(a.qft_args))
    export_layerwise(local_dir(a.model), a.save, cfg, calib, tokenizer=load_tokenizer(a.model), dtype="bfloat16",
                     progress=False, **ROADS[a.road])
    secs = time.perf_counter() - t0
    Path(a.result).write_text(json.dumps({"s": secs, "whole_s": secs, "peak_rss_mb": rss_mb(),
                                          "config": cfg.to_dict(), "road": a.road}))


def worker_gptqmodel(a):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    from qft.models import smollm2_path

    t_all = time.perf_counter()
    path = str(smollm2_path()) if a.model == "smollm2-135m" else a.model
    calib = torch.load(a.tokens)
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in calib]
    qc = QuantizeConfig(bits=4, group_size=a.group, sym=True)
    model = GPTQModel.load(path, qc, dtype=torch.bfloat16, device="cpu")
    t0 = time.perf_counter()
    model.quantize(data)
    secs = time.perf_counter() - t0
    tmp = Path(a.save)
    model.save(str(tmp))
    Path(a.result).write_text(json.dumps({"s": secs, "whole_s": time.perf_counter() - t_all, "peak_rss_mb": rss_mb(),
                                          "config": {k: str(v) for k, v in vars(qc).items()}}))


def start_worker(python, kind, group, tok_file, workdir, model, qft_args, env=None):
    """``kind``: ``gptqmodel``, or ``qft`` / ``qft_<road>`` (``ROADS``, dashes as underscores)."""
    save = workdir / f"{kind}-g{group}"
    res = workdir / f"{kind}-g{group}.json"
    road = kind[len("qft_"):].replace("_", "-") if kind.startswith("qft_") else None
    worker = "qft-layerwise" if road else kind
    cmd = [python, __file__, "--worker", worker, "--group", str(group), "--tokens", str(tok_file), "--save", str(save),
           "--result", str(res), "--model", model, "--qft-args", qft_args, *(["--road", road] if road else [])]
    log = open(workdir / f"{kind}-g{group}.log", "w")
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    return p, save, res, time.perf_counter()


def finish_worker(handle):
    p, save, res, t0 = handle
    if p.wait():
        print(f"worker failed, see {res.with_suffix('.log')}", file=sys.stderr)
        return None, None
    info = json.loads(res.read_text())
    info["wall_s"] = time.perf_counter() - t0
    return info, save


def interop_ok(python) -> str | None:
    if not Path(python).exists():
        return f"{python} not found"
    p = subprocess.run([python, "-c", "import gptqmodel, optimum"], capture_output=True, text=True)
    return None if p.returncode == 0 else "gptqmodel/optimum do not import: " + p.stderr.strip()[-300:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=False, help="JSON file to write (refuses to overwrite unless --force)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--interop-python", default=INTEROP)
    ap.add_argument("--skip-gptqmodel", action="store_true")
    ap.add_argument("--qft-roads", nargs="+", default=["memory"], choices=list(ROADS),
                    help="qft's ways to export (rows qft, qft_layerwise, ...); see the module docstring")
    ap.add_argument("--qft-args", default="{}", help="extra GPTQConfig fields as JSON, e.g. '{\"desc_act\": true}'")
    ap.add_argument("--keep", default=None, help="directory to keep the checkpoints in")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the qft and GPTQModel workers at the same time (equal load on a shared machine)")
    # worker mode
    ap.add_argument("--worker", choices=["qft", "qft-layerwise", "gptqmodel"])
    ap.add_argument("--road", choices=list(ROADS), default="layerwise")
    ap.add_argument("--group", type=int)
    ap.add_argument("--tokens")
    ap.add_argument("--save")
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.worker:
        return {"qft": worker_qft, "qft-layerwise": worker_qft_layerwise, "gptqmodel": worker_gptqmodel}[a.worker](a)
    if not a.out:
        ap.error("--out F.json is required")
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")

    from qft.export import GPTQConfig, load_quantized, quantize_model
    from qft.models import load

    torch.manual_seed(0)
    ev, calib = tokens(a.model, a.n_samples, a.seq_len, a.eval_windows, a.eval_len)
    workdir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tok_file = workdir / "calib.pt"
    torch.save(calib, tok_file)
    result = {"model": a.model, "concurrent": a.concurrent, "command": " ".join(sys.argv), "dtype": "bfloat16",
              "calibration": list(calib.shape),
              "eval": [a.eval_windows, a.eval_len], "cpu_threads": torch.get_num_threads(),
              "machine": os.uname().nodename, "runs": {}}

    model, _ = load(a.model, dtype=torch.bfloat16)
    model.eval()
    result["fp_ppl"] = perplexity(model, ev)
    result["forward_pass_s"] = forward_pass_s(model, calib)
    print(f"fp_ppl {result['fp_ppl']:.3f}  forward_pass_s {result['forward_pass_s']:.1f}", flush=True)
    del model

    skip = "--skip-gptqmodel" if a.skip_gptqmodel else interop_ok(a.interop_python)
    if skip:
        result["gptqmodel_skipped"] = skip
    for g in a.groups:
        r = {}
        m, _ = load(a.model, dtype=torch.bfloat16)
        quantize_model(m, GPTQConfig(bits=4, group_size=g, method="rtn"), progress=False)
        r["rtn_ppl"] = perplexity(m.eval(), ev)
        del m
        order = [("qft" if road == "memory" else "qft_" + road.replace("-", "_"), sys.executable, None)
                 for road in a.qft_roads]
        if not skip:
            order.append(("gptqmodel", a.interop_python, {"GPTQMODEL_CPU_WORKERS": "2"}))
        if a.concurrent:  # both at once: the same (shared, noisy) CPU load for both
            handles = [(kind, start_worker(py, kind, g, tok_file, workdir, a.model, a.qft_args, env))
                       for kind, py, env in order]
            done = [(kind, finish_worker(h)) for kind, h in handles]
        else:  # one after the other
            done = [(kind, finish_worker(start_worker(py, kind, g, tok_file, workdir, a.model, a.qft_args, env)))
                    for kind, py, env in order]
        for kind, (info, ckpt) in done:
            if info is None:
                r[f"{kind}_error"] = "worker failed (see its log)"
                continue
            qm = load_quantized(ckpt, dtype=torch.bfloat16)
            r[f"{kind}_ppl"] = perplexity(qm, ev)
            r[f"{kind}_s"] = info["s"]
            r[f"{kind}_whole_s"] = info.get("whole_s")
            r[f"{kind}_peak_rss_mb"] = info["peak_rss_mb"]
            r[f"{kind}_config"] = info["config"]
            del qm
            print(f"g{g} {kind}: ppl {r[f'{kind}_ppl']:.3f}  {info['s']:.1f} s  rss {info['peak_rss_mb']:.0f} MB",
                  flush=True)
        r["qft_s_over_forward"] = r.get("qft_s", float("nan")) / result["forward_pass_s"]
        if "gptqmodel_s" in r and "qft_s" in r:
            r["qft_s_over_gptqmodel_s"] = r["qft_s"] / r["gptqmodel_s"]
            r["qft_ppl_minus_gptqmodel_ppl"] = r["qft_ppl"] - r["gptqmodel_ppl"]
        result["runs"][f"g{g}"] = r
    first = result["runs"][f"g{a.groups[0]}"]
    for k in ("rtn_ppl", "qft_ppl", "qft_s", "qft_peak_rss_mb", "gptqmodel_ppl", "gptqmodel_s",
              "gptqmodel_peak_rss_mb"):
        if k in first:
            result[k] = first[k]
    result["headline_group"] = a.groups[0]

    print(f"\n{'group':>6} {'fp':>7} {'rtn':>7} {'qft':>7} {'gptqm':>7} {'qft_s':>7} {'gptqm_s':>8} {'s ratio':>8} "
          f"{'/fwd':>6} {'qft MB':>7} {'gptqm MB':>8}")
    for g in a.groups:
        r = result["runs"][f"g{g}"]
        f = lambda k, spec=".2f": format(r[k], spec) if k in r else "-"  # noqa: E731
        print(f"{g:>6} {result['fp_ppl']:>7.2f} {f('rtn_ppl'):>7} {f('qft_ppl'):>7} {f('gptqmodel_ppl'):>7} "
              f"{f('qft_s', '.1f'):>7} {f('gptqmodel_s', '.1f'):>8} {f('qft_s_over_gptqmodel_s'):>8} "
              f"{f('qft_s_over_forward'):>6} {f('qft_peak_rss_mb', '.0f'):>7} {f('gptqmodel_peak_rss_mb', '.0f'):>8}")
    from result_file import write_result

    write_result(a.out, result, replace=a.force)
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
