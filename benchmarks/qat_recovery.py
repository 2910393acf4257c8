"""How much of the PTQ perplexity loss does QAT recover? (issue 4)

Arms, all from the same pretrained model, on the same batches in the same order, same optimizer:
  (a) plain fine-tune -> fp perplexity, then RTN on the export grid (prepare+convert of the trained
      weights = round-to-nearest with fp16 scales) -> PTQ perplexity, per bit width;
  (b) QAT with qft.qat (fake-quant on that grid) -> qft.qat.convert -> QAT perplexity, per bit width;
  (c) torchao (optional): a side-by-side micro-benchmark of one int4 weight fake-quant forward+backward
      (qft vs torchao, interleaved) on SmolLM2's linear shapes, and with ``--torchao full`` the same
      int4 QAT run with torchao's fake-quant and with qft's at ``--torchao-group`` (torchao needs
      group_size to divide in_features, and SmolLM2's 576 is not a multiple of 128), torchao's trained
      weights exported on the GPTQ grid qft writes.
Perplexity is on the held-out 10% of Tiny Shakespeare (split by characters, data README).
``recovered = (ptq - qat) / (ptq - fp)``; ``step_time_ratio`` = median QAT step / median plain step.

torchao is optional and never a qft dependency: put it on PYTHONPATH (e.g. ``pip install --target
/tmp/torchao_pkg --no-deps torchao``) or the torchao arm is skipped and the JSON says why.

    python benchmarks/qat_recovery.py --out qat.json [--steps 40 --seq-len 256 --eval-tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qft.evaluate import perplexity  # noqa: E402
from qft.models import load_model, load_tokenizer  # noqa: E402
from qft.qat import QATConfig, convert, prepare  # noqa: E402
from qft.quant import QuantScheme  # noqa: E402


def scheme_for(bits: int, group: int) -> QuantScheme:
    # the data README's RTN anchors: 4-bit symmetric, 3-bit asymmetric (symmetric 3-bit wastes a level)
    return QuantScheme(bits=bits, group_size=group, symmetric=bits >= 4)


def qat_config(bits, group, **kw) -> QATConfig:
    # SmolLM2's 576-wide inputs leave a short last group of 64 at group 128 (GPTQ allows it)
    return QATConfig(weight=scheme_for(bits, group), allow_partial_groups=True, **kw)


def split_tokens(path: Path, tok):
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    ids = lambda t: torch.tensor(tok(t)["input_ids"], dtype=torch.long)  # noqa: E731
    return ids(text[:cut]), ids(text[cut:])


def batches(train_ids, steps, batch, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train_ids.numel() - seq_len, (steps, batch), generator=g)
    return [torch.stack([train_ids[s:s + seq_len] for s in row.tolist()]) for row in starts]


def train(model, data, lr):
    """Plain AdamW loop; returns per-step wall times (s)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    times = []
    for x in data:
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torchao_available():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig as AOQATConfig  # noqa: F401
        return torchao.__version__, None
    except Exception as e:  # not installed, or incompatible with this torch
        return None, f"{type(e).__name__}: {e}"


def torchao_prepare(model, bits, group, symmetric):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig as AOQATConfig

    dtype = {4: torch.int4, 3: torch.int3, 2: torch.int2}[bits]
    wc = IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=symmetric)
    quantize_(model, AOQATConfig(weight_config=wc, step="prepare"),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))


def fake_quant_microbench(group, reps):
    """One weight fake-quant forward+backward on SmolLM2-135M's linear shapes, qft vs torchao, interleaved."""
    from qft.qat.fake_quant import grouped, ste_fake_quant
    from qft.quant.grid import weight_params
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    s = QuantScheme(bits=4, group_size=group, symmetric=True)
    ao = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=group, is_symmetric=True))
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    ws = [torch.randn(*sh, requires_grad=True) for sh in shapes]

    def ours(w):
        scale, zero = weight_params(w, s)
        return ste_fake_quant(grouped(w, group), scale.unsqueeze(-1), zero.unsqueeze(-1), s.maxq).reshape(w.shape)

    t = {"qft": [], "torchao": []}
    for _ in range(reps):
        for name, fn in (("qft", ours), ("torchao", ao)):
            start = time.perf_counter()
            for w in ws:
                fn(w).sum().backward()
            t[name].append(time.perf_counter() - start)
    with torch.no_grad():  # how far torchao's int4 grid is from the GPTQ grid export writes
        diffs = [(ours(w) - ao(w)).abs() for w in ws]
    grid = {"max_abs_diff": max(d.max().item() for d in diffs),
            "frac_weights_differ": sum((d > 1e-6).sum().item() for d in diffs) / sum(d.numel() for d in diffs)}
    return {k: statistics.median(v) * 1000 for k, v in t.items()}, grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result file (refuses to overwrite)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="training steps per arm")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (seq-len windows)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--range-learning", action="store_true", help="QAT arm learns scales (LSQ)")
    p.add_argument("--torchao", choices=["full", "micro", "off"], default="full",
                   help="full: micro-benchmark + QAT arms; micro: micro-benchmark only")
    p.add_argument("--torchao-group", type=int, default=64, help="group size of the torchao comparison")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-only", action="store_true", help="only the qft-vs-torchao fake-quant micro-benchmark")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        sys.exit(f"{out} exists; refusing to overwrite (pick another --out).")
    if a.threads:
        torch.set_num_threads(a.threads)
    data_path = Path(a.data)
    if not data_path.is_file():
        sys.exit(f"no data at {data_path}; see ../shared/data/README.md")
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    tok = load_tokenizer(a.model)
    train_ids, val_ids = split_tokens(data_path, tok)
    data = batches(train_ids, a.steps, a.batch_size, a.seq_len, a.seed)
    n_windows = max(1, a.eval_tokens // a.seq_len)
    ppl = lambda m: perplexity(m, val_ids, seq_len=a.seq_len, max_windows=n_windows)  # noqa: E731
    probe = val_ids[: a.seq_len].unsqueeze(0)
    res = {"config": {k: v for k, v in vars(a).items() if k != "out"}, "machine": {
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": sys.platform},
        "train_tokens": a.steps * a.batch_size * a.seq_len, "eval_tokens": n_windows * a.seq_len}

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if a.micro_only:
        version, why = torchao_available()
        if version is None:
            sys.exit(f"--micro-only needs torchao on PYTHONPATH: {why}")
        micro, grid = fake_quant_microbench(a.torchao_group, reps=50)
        res = {"config": res["config"], "machine": res["machine"], "torchao": {
            "version": version, "group_size": a.torchao_group, "fake_quant_op_ms": micro,
            "fake_quant_op_speedup": micro["torchao"] / micro["qft"], "grid_vs_gptq_export": grid}}
        print(json.dumps(res["torchao"], indent=1))
        _write(out, res)
        return

    # (a) plain fine-tune, then PTQ (RTN on the export grid) per bit width
    model = load_model(a.model)
    res["pretrained_ppl"] = ppl(model)
    log(f"pretrained ppl {res['pretrained_ppl']:.3f}")
    plain_times = train(model, data, a.lr)
    fp_ppl = ppl(model)
    log(f"plain: fp ppl {fp_ppl:.3f}, median step {statistics.median(plain_times):.2f}s")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    ptq = {}
    for bits in a.bits:
        model.load_state_dict(trained)
        prepare(model, qat_config(bits, a.group_size))
        convert(model)
        ptq[bits] = ppl(model)
        log(f"PTQ int{bits}: ppl {ptq[bits]:.3f}")
        model = load_model(a.model)
    del trained

    # (b) QAT per bit width
    for bits in a.bits:
        model = load_model(a.model)
        prepare(model, qat_config(bits, a.group_size, range_learning=a.range_learning))
        times = train(model, data, a.lr)
        model.eval()
        with torch.no_grad():
            fq_logits = model(input_ids=probe).logits
        convert(model)
        with torch.no_grad():
            diff = (model(input_ids=probe).logits - fq_logits).abs().max().item()
        qat_ppl = ppl(model)
        r = {"fp_ppl": fp_ppl, "ptq_ppl": ptq[bits], "qat_ppl": qat_ppl,
             "recovered": (ptq[bits] - qat_ppl) / (ptq[bits] - fp_ppl) if ptq[bits] != fp_ppl else math.nan,
             "step_time_ratio": statistics.median(times) / statistics.median(plain_times),
             "plain_step_s": statistics.median(plain_times), "qat_step_s": statistics.median(times),
             "convert_max_abs_logit_diff": diff, "scheme": scheme_for(bits, a.group_size).to_dict()}
        res[f"int{bits}"] = r
        log(f"QAT int{bits}: ppl {qat_ppl:.3f}, recovered {r['recovered']:.3f}, step ratio "
            f"{r['step_time_ratio']:.3f}, convert diff {diff:.2e}")
        del model

    # (c) torchao
    version, why = torchao_available() if a.torchao != "off" else (None, "--torchao off")
    res["torchao"] = {"version": version, "skipped": why, "group_size": a.torchao_group}
    if version is not None:
        micro, grid = fake_quant_microbench(a.torchao_group, reps=20)
        res["torchao"]["fake_quant_op_ms"] = micro
        res["torchao"]["fake_quant_op_speedup"] = micro["torchao"] / micro["qft"]
        res["torchao"]["grid_vs_gptq_export"] = grid
        log(f"fake-quant fwd+bwd (4 shapes): qft {micro['qft']:.2f} ms, torchao {micro['torchao']:.2f} ms")
    if version is not None and a.torchao == "full":
        g = a.torchao_group
        model = load_model(a.model)
        prepare(model, qat_config(4, g))
        convert(model)
        ptq_g = ppl(model)
        model = load_model(a.model)
        prepare(model, qat_config(4, g))
        qft_times = train(model, data, a.lr)
        convert(model)
        qft_g = ppl(model)
        model = load_model(a.model)
        torchao_prepare(model, 4, g, True)
        times = train(model, data, a.lr)
        fq = ppl(model)  # torchao's own fake-quant numerics
        plain = load_model(a.model)  # its trained weights, exported on the GPTQ grid qft writes
        plain.load_state_dict(model.state_dict(), strict=False)
        prepare(plain, qat_config(4, g))
        convert(plain)
        exported = ppl(plain)
        med = statistics.median(plain_times)
        res["torchao"]["int4"] = {
            "ptq_ppl": ptq_g, "qft_qat_ppl": qft_g, "torchao_fake_quant_ppl": fq, "torchao_exported_ppl": exported,
            "qft_recovered": (ptq_g - qft_g) / (ptq_g - fp_ppl), "torchao_recovered": (ptq_g - exported) / (ptq_g - fp_ppl),
            "qft_step_time_ratio": statistics.median(qft_times) / med,
            "torchao_step_time_ratio": statistics.median(times) / med}
        log(f"torchao int4 g{g}: {res['torchao']['int4']}")
        del model, plain
    res["wall_s"] = time.perf_counter() - t_start
    res["peak_rss_mb"] = rss_mb()

    print(f"\n{'bits':>4} {'fp_ppl':>8} {'ptq_ppl':>8} {'qat_ppl':>8} {'recovered':>9} {'step_ratio':>10}")
    for bits in a.bits:
        r = res[f"int{bits}"]
        print(f"{bits:>4} {r['fp_ppl']:8.3f} {r['ptq_ppl']:8.3f} {r['qat_ppl']:8.3f} {r['recovered']:9.3f} "
              f"{r['step_time_ratio']:10.3f}")
    t = res["torchao"]
    if "fake_quant_op_ms" in t:
        print(f"int4 g{t['group_size']} weight fake-quant fwd+bwd: qft {t['fake_quant_op_ms']['qft']:.2f} ms, torchao "
              f"{t['fake_quant_op_ms']['torchao']:.2f} ms ({t['fake_quant_op_speedup']:.2f}x)")
    if "int4" in t:
        r = t["int4"]
        print(f"int4 g{t['group_size']}: PTQ {r['ptq_ppl']:.3f}, qft QAT {r['qft_qat_ppl']:.3f} (step ratio "
              f"{r['qft_step_time_ratio']:.3f}), torchao QAT exported {r['torchao_exported_ppl']:.3f} "
              f"(fake-quant {r['torchao_fake_quant_ppl']:.3f}, step ratio {r['torchao_step_time_ratio']:.3f})")
    print(f"wall {res['wall_s']:.0f}s, peak RSS {res['peak_rss_mb']:.0f} MB")
    _write(out, res)


def _write(out: Path, res: dict) -> None:
    """Write to a temporary sibling, then rename (never a half-written result)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
