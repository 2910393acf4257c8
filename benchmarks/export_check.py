"""Where the export's last check (``qft.export.verify``) sits: KL / KL_uniform of normal exports, by format.

    python benchmarks/export_check.py --out F.json [--n-samples 32] [--seq-len 512]

Each row exports the released SmolLM2-135M (fp32 weights, bf16 calibration) with qft's own entry points and
reads what the export's check measured on its check batch (the first calibration window, 512 tokens):
``kl`` = mean KL(model || written checkpoint) per token, ``kl_uniform`` = KL(model || uniform), and their
ratio, against the limit the check refuses beyond (``kl_limit``). Calibration: WikiText-2 test's second
half (the shared protocol, ``shared/data/README.md``). The rows run one after another in this process.

Two more rows put the broken folds the check and the fold check exist for beside them: tiny-gemma3's
``1 + w`` norms folded as ``w`` (qft before the fold check), for AWQ and SmoothQuant, exported with the
fold check switched off; the fold check (``qft.export.fold``) refuses every one of those folds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rows():
    from qft.export import GPTQConfig
    from qft.export.gguf.config import GGUFConfig
    from qft.ptq import W8A8Config

    return {
        "rtn_int8": ("gptq", GPTQConfig(bits=8, group_size=-1, method="rtn")),
        "rtn_int4_g64": ("gptq", GPTQConfig(bits=4, group_size=64, method="rtn")),
        "gptq_int4_g64": ("gptq", GPTQConfig(bits=4, group_size=64)),
        "awq_int4_g64": ("gptq", GPTQConfig(bits=4, group_size=64, sym=False, method="awq")),
        "rtn_int3_g64": ("gptq", GPTQConfig(bits=3, group_size=64, method="rtn")),
        "rtn_int2_g64": ("gptq", GPTQConfig(bits=2, group_size=64, method="rtn")),
        "sparsegpt_50": ("gptq", GPTQConfig(method="none", sparsity=0.5, prune_method="sparsegpt")),
        "sparsegpt_50_int4": ("gptq", GPTQConfig(bits=4, group_size=64, sparsity=0.5, prune_method="sparsegpt")),
        "w8a8_dynamic": ("w8a8", W8A8Config()),
        "w8a8_static_sq": ("w8a8", W8A8Config(activation="static", smoothquant=0.8)),
        "gguf_q4_k_m": ("gguf", GGUFConfig(quant="Q4_K_M")),
        "gguf_q4_0": ("gguf", GGUFConfig(quant="Q4_0")),
    }


def export_row(kind, cfg, model, tok, calib, out):
    from qft.export.gguf.export import export_trained
    from qft.export.pipeline import export
    from qft.ptq.export import export_w8a8

    if kind == "gptq":
        return export(model, tok, calib, out, cfg, progress=False, measure_drift=False)
    if kind == "w8a8":
        return export_w8a8(model, tok, calib, out, cfg, progress=False)
    return export_trained(model, tok, calib, str(out) + ".gguf", cfg, base_name="smollm2-135m", progress=False)


def broken_folds(work: Path) -> dict:
    """tiny-gemma3's norms folded as if they computed x̂ ⊙ w, with the fold check off: the check's figures."""
    import qft.export.fold as fold
    from qft.export import GPTQConfig
    from qft.models import load_model, load_tokenizer
    from qft.ptq import W8A8Config

    tok = load_tokenizer("tiny-gemma3")
    calib = torch.randint(0, 5000, (16, 64), generator=torch.Generator().manual_seed(1))
    real_offset, real_tol = fold.norm_offset, dict(fold.TOLERANCE)
    fold.norm_offset = lambda norm, atol=1e-3: 0.0
    fold.TOLERANCE.update({k: float("inf") for k in fold.TOLERANCE})
    out = {}
    try:
        for name, kind, cfg in (("tiny_gemma3_awq_wrong_fold", "gptq", GPTQConfig(bits=4, group_size=64, method="awq")),
                                ("tiny_gemma3_sq_wrong_fold", "w8a8",
                                 W8A8Config(activation="static", smoothquant=0.8))):
            s = export_row(kind, cfg, load_model("tiny-gemma3").eval(), tok, calib, work / name)
            out[name] = s["check"]
        for name, kind, cfg in (("tiny_gemma3_awq", "gptq", GPTQConfig(bits=4, group_size=64, method="awq")),
                                ("tiny_gemma3_sq", "w8a8", W8A8Config(activation="static", smoothquant=0.8))):
            fold.norm_offset = real_offset
            fold.TOLERANCE.update(real_tol)
            s = export_row(kind, cfg, load_model("tiny-gemma3").eval(), tok, calib, work / name)
            out[name] = s["check"]
    finally:
        fold.norm_offset = real_offset
        fold.TOLERANCE.update(real_tol)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", nargs="+", default=None)
    a = ap.parse_args()
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")
    warnings.simplefilter("ignore")
    from gptq_vs_gptqmodel import tokens
    from result_file import write_result

    from qft.export.verify import ExportCheckError
    from qft.models import load

    _, calib = tokens("smollm2-135m", a.n_samples, a.seq_len, 1, 1024)
    work = Path(tempfile.mkdtemp(prefix="export-check-"))
    res = {"command": " ".join(sys.argv), "calibration": list(calib.shape), "rows": {}}
    for name, (kind, cfg) in rows().items():
        if a.rows and name not in a.rows:
            continue
        model, tok = load("smollm2-135m", dtype=torch.float32)
        t0 = time.perf_counter()
        try:
            s = export_row(kind, cfg, model.eval(), tok, calib, work / name)
            c, refused = s["check"], None
        except ExportCheckError as e:  # what the check is for: the row records the refusal and its figures
            s, c, refused = {}, e.found, str(e)
        res["rows"][name] = {**c, "s": time.perf_counter() - t0, "save_dtype": s.get("save_dtype"), "refused": refused}
        print(f"{name:20s} kl {c['kl']:.4f}  kl_uniform {c['kl_uniform']:.3f}  ratio {c['kl_ratio']:.4f}  "
              f"limit {c['limit']}{'  REFUSED' if refused else ''}", flush=True)
        del model
    res["broken_folds"] = broken_folds(work)
    for name, c in res["broken_folds"].items():
        print(f"{name:28s} kl {c['kl']:.4f}  ratio {c['kl_ratio']:.4f}", flush=True)
    write_result(a.out, res, replace=a.force)


if __name__ == "__main__":
    main()
