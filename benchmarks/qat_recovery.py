"""How much of the PTQ perplexity loss does QAT recover? (issues 4 and 14)

    python benchmarks/qat_recovery.py --out qat.json [--steps 160 --batch-size 4 --seq-len 128]

Arms, all from the same pretrained SmolLM2-135M (fp32), trained **in lockstep**: at every step each arm
takes one AdamW step on the same batch, in an order that rotates from step to step, so every arm's step
times are taken under the same machine conditions and ``step_time_ratio`` (median arm step / median
plain step) compares interleaved steps, not runs taken one after another:

- ``plain``: full fine-tune; then PTQ of the fine-tune per bit width, two ways: RTN on the export grid
  (``qft.qat.prepare`` + ``convert``: round-to-nearest, fp16 scales) and GPTQ (``qft.export.sequential
  .quantize_model`` on ``--calib-windows`` training windows);
- ``qat_int{bits}``: QAT with ``qft.qat`` (learned scales, LSQ, on the export grid), then
  ``qft.qat.convert`` to packed ``GPTQLinear``; ``convert_max_abs_logit_diff`` checks that the converted
  model computes what the fake-quant model computed;
  Its learned scales start where ``--scale-init`` says (``QATConfig.init``: ``minmax``, or ``mse``, the
  clipping search) and train at ``--lr`` times ``--scale-lr-mult`` (``QATConfig.lr_multiplier``);
- ``qat_int4_lrx{m}`` (``--lsq-lr-mult``) and ``qat_int4_mse_lrx{m}`` (``--mse-lr-mult``): more int4 LSQ
  arms, their scales from min-max or the clipping search, at ``--lr`` times ``m``, the rest at ``--lr``;
- ``solved_int4_at{step}`` (``--solve-at``, fractions of ``--steps``): the grid solved once by GPTQ on the
  same ``--calib-windows`` (``qft.qat.solve``, what ``QATConfig(init=GridSolve(...))`` does in a fit), then
  fixed: the weights train against it with the plain STE. Before the solve step the arm fine-tunes in fp
  (fake-quant off), so ``at0`` is GPTQ of the pretrained model then QAT, and ``at{steps/2}`` is half a
  fine-tune, GPTQ, then QAT on that grid. The solve's seconds are kept out of the step times, and the
  step ratio is over the steps after the solve;
- ``torchao_int4`` (when torchao imports): torchao's ``IntxFakeQuantizer`` QAT at the same group, its
  trained weights then exported on the GPTQ grid qft writes (RTN), since that is what a GPTQ runtime loads.

int4 is symmetric, int3 asymmetric (the data README's RTN conventions), both at ``--group-size`` (64:
SmolLM2's 576-wide inputs split evenly). Perplexity is on the held-out 10% of Tiny Shakespeare (split by
characters, data README), first ``--eval-tokens`` tokens in ``--seq-len`` windows, fp32.
``recovered = (ptq - qat) / (ptq - fp)`` against RTN, and ``recovered_vs_gptq`` against GPTQ.

torchao is optional and never a qft dependency: ``make torchao`` installs it (``--no-deps``) into
``.venv-torchao/``, which this script puts on ``sys.path`` when present; without it the arm is skipped and
the JSON says why. ``--micro-only`` runs only the interleaved fake-quant micro-benchmark (qft vs torchao);
``--step-time-only`` only the lockstep training, for the step-time ratios.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT / ".venv-torchao").is_dir():  # `make torchao`: torchao for this benchmark only, never a qft dependency
    sys.path.append(str(ROOT / ".venv-torchao"))

from qft.evaluate import perplexity  # noqa: E402
from qft.models import load_model, load_tokenizer  # noqa: E402
from qft.qat import QATConfig, convert, prepare  # noqa: E402
from qft.qat.callback import _own_param_group  # noqa: E402  (the fit's scale group, not a copy)
from qft.qat.prepare import set_state  # noqa: E402
from qft.qat.solve import GridSolve, solve_and_install  # noqa: E402
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


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torchao_available():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
        from torchao.quantization.qat import IntxFakeQuantizeConfig  # noqa: F401
        from torchao.quantization.qat import QATConfig as AOQATConfig  # noqa: F401
        return torchao.__version__, None
    except Exception as e:  # not installed, or incompatible with this torch
        return None, f"{type(e).__name__}: {e}"


def torchao_prepare(model, bits, group, symmetric):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat import QATConfig as AOQATConfig

    dtype = {4: torch.int4, 3: torch.int3, 2: torch.int2}[bits]
    wc = IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=symmetric)
    quantize_(model, AOQATConfig(weight_config=wc, step="prepare"),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))


def fake_quant_microbench(group, reps):
    """One weight fake-quant forward+backward on SmolLM2-135M's linear shapes, qft vs torchao, interleaved."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    from qft.qat.fake_quant import grouped, ste_fake_quant
    from qft.quant.grid import weight_params

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


def make_arms(a) -> dict:
    """name -> (model, optimizer): the plain fine-tune, one QAT model per width, torchao's int4 QAT."""
    arms = {"plain": load_model(a.model)}
    for bits in a.bits:
        m = load_model(a.model)
        prepare(m, qat_config(bits, a.group_size, range_learning=True, init=a.scale_init))
        arms[f"qat_int{bits}"] = m
    for name, (_, init) in a.lsq.items():
        m = load_model(a.model)
        prepare(m, qat_config(4, a.group_size, range_learning=True, init=init))
        arms[name] = m
    for name in a.solved:
        m = load_model(a.model)
        prepare(m, qat_config(4, a.group_size))
        set_state(m, enabled=False, observing=False)  # fp until the solve step
        arms[name] = m
    if a.torchao_version:
        m = load_model(a.model)
        torchao_prepare(m, 4, a.group_size, True)
        arms["torchao_int4"] = m
    mult = {k: v[0] for k, v in a.lsq.items()} | {f"qat_int{bits}": a.scale_lr_mult for bits in a.bits}
    return {k: (m, optimizer(m, a.lr, mult.get(k, 1.0))) for k, m in arms.items()}


def optimizer(model, lr: float, scale_mult: float):
    """AdamW over the trainable parameters; with ``scale_mult != 1`` the learned scales and zeros move to
    their own group at ``lr * scale_mult`` by the very code ``QATCallback(lr_multiplier=...)`` runs in a fit."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if scale_mult != 1.0:
        scales = [p for mod in model.modules() if hasattr(mod, "qat_params") for p in mod.qat_params()]
        _own_param_group(opt, scales, scale_mult, [])
    return opt


def train_lockstep(arms: dict, data, log, dtype=torch.float32, before: dict | None = None) -> dict:
    """One step of every arm per batch, in a rotating order; returns per-arm step times and losses.
    ``dtype`` bfloat16 runs each forward under CPU autocast (the weights, grads and AdamW stay fp32).
    ``before`` ``{step: [fn(arms)]}`` runs untimed before that step (the grid solves)."""
    names = list(arms)
    times = {k: [] for k in names}
    losses = {k: [] for k in names}
    for m, _ in arms.values():
        m.train()
    for i, x in enumerate(data):
        for fn in (before or {}).get(i, []):
            fn(arms)
        for k in names[i % len(names):] + names[: i % len(names)]:
            model, opt = arms[k]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[k].append(time.perf_counter() - t)
            losses[k].append(loss.item())
        if i % 10 == 0 or i == len(data) - 1:
            log(f"step {i}: " + ", ".join(f"{k} {losses[k][-1]:.3f} ({times[k][-1]:.2f}s)" for k in names))
    return {"times": times, "losses": losses}


def ptq(trained_state, a, bits, calib, log) -> dict:
    """PTQ of the plain fine-tune at ``bits``: RTN on the export grid, and GPTQ."""
    from qft.export.config import GPTQConfig
    from qft.export.sequential import quantize_model

    out = {}
    model = load_model(a.model)
    model.load_state_dict(trained_state)
    prepare(model, qat_config(bits, a.group_size))
    convert(model)
    out["rtn"] = a.ppl(model)
    model = load_model(a.model)
    model.load_state_dict(trained_state)
    t = time.perf_counter()
    quantize_model(model, GPTQConfig(bits=bits, group_size=a.group_size, sym=bits >= 4), tokens=calib, progress=False)
    out["gptq_s"] = time.perf_counter() - t
    out["gptq"] = a.ppl(model)
    log(f"PTQ int{bits}: RTN {out['rtn']:.3f}, GPTQ {out['gptq']:.3f} ({out['gptq_s']:.0f} s)")
    return out


def gptq_after_qat(model, a, bits, calib, log) -> dict:
    """GPTQ of the QAT arm's latent (fp) weights, after training: on the scales QAT learned (the codes
    re-solved toward the latent weights, ``quantize_model``'s ``grid_for`` road) and on a fresh grid.
    Diagnostics of what a post-training solve adds to QAT; the QAT figure itself stays the converted model."""
    from qft import layers
    from qft.export.config import GPTQConfig
    from qft.export.merge import merge_adapters
    from qft.export.sequential import quantize_model

    cfg = GPTQConfig(bits=bits, group_size=a.group_size, sym=bits >= 4)
    learned = layers.grids(layers.unwrap(model))
    out = {}
    for road in ("learned_scales", "fresh_grid"):
        latent = merge_adapters(model, None, merge_into="trained")
        t = time.perf_counter()
        grid_for = (lambda name, W, H: (learned[name].scale, learned[name].zero)) if road == "learned_scales" \
            else None
        quantize_model(latent, cfg, tokens=calib, progress=False, refine=road == "learned_scales", grid_for=grid_for)
        out[road] = {"ppl": a.ppl(latent), "seconds": time.perf_counter() - t}
        log(f"GPTQ after QAT int{bits}, {road}: ppl {out[road]['ppl']:.3f}")
        del latent
    return out


def main(argv=None):
    from result_file import write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result file (refuses to overwrite)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=160, help="training steps (every arm takes each one)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored (seq-len windows)")
    p.add_argument("--calib-windows", type=int, default=64, help="training windows GPTQ calibrates on")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="training forward under autocast ('auto': bfloat16 where the CPU has native bf16); "
                        "evaluation is always fp32")
    p.add_argument("--torchao", choices=["on", "off"], default="on", help="the torchao arm and micro-benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    p.add_argument("--solve-at", type=float, nargs="*", default=[],
                   help="int4 arms whose grid GPTQ solves once at this fraction of --steps, then fixed "
                        "(e.g. 0 0.5; measured behind learned scales, BENCHMARKS.md, so none by default)")
    p.add_argument("--scale-init", choices=["minmax", "mse"], default="minmax",
                   help="where the qat_int{bits} arms' learned scales start (QATConfig.init)")
    p.add_argument("--scale-lr-mult", type=float, default=QATConfig.lr_multiplier,
                   help="the qat_int{bits} arms' learned scales train at --lr times this (QATConfig.lr_multiplier)")
    p.add_argument("--lsq-lr-mult", type=float, nargs="*", default=[],
                   help="extra int4 LSQ arms (scales from min-max) whose learned scales train at --lr times this")
    p.add_argument("--mse-lr-mult", type=float, nargs="*", default=[],
                   help="extra int4 LSQ arms (scales from the clipping search) at --lr times this")
    p.add_argument("--gptq-after", action="store_true",
                   help="also GPTQ the QAT arms' latent weights after training (on the learned scales, and fresh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-only", action="store_true", help="only the qft-vs-torchao fake-quant micro-benchmark")
    p.add_argument("--step-time-only", action="store_true",
                   help="only the lockstep training (step times and their ratios to plain); "
                        "no PTQ, no evaluation after it")
    a = p.parse_args(argv)
    if any(not 0 <= f < 1 for f in a.solve_at):
        p.error(f"--solve-at {a.solve_at}: fractions of --steps in [0, 1), e.g. --solve-at 0 0.5")
    if a.solve_at and 4 not in a.bits:
        p.error("--solve-at: the solved arms are int4 and compare with the int4 PTQ; keep 4 in --bits")
    a.solved = {f"solved_int4_at{int(f * a.steps)}": int(f * a.steps) for f in a.solve_at}
    for flag, mults in (("--lsq-lr-mult", a.lsq_lr_mult), ("--mse-lr-mult", a.mse_lr_mult)):
        if any(m <= 0 for m in mults) or (mults and 4 not in a.bits):
            p.error(f"{flag} {mults}: positive multipliers of --lr, with 4 in --bits (int4 arms)")
    if a.scale_lr_mult <= 0:
        p.error(f"--scale-lr-mult {a.scale_lr_mult}: a positive multiplier of --lr (1: the model's lr)")
    a.lsq = {f"qat_int4_lrx{m:g}": (m, "minmax") for m in a.lsq_lr_mult} | \
        {f"qat_int4_mse_lrx{m:g}": (m, "mse") for m in a.mse_lr_mult}
    out = Path(a.out)
    if out.exists():
        sys.exit(f"{out} exists; refusing to overwrite (pick another --out).")
    if a.threads:
        torch.set_num_threads(a.threads)
    data_path = Path(a.data)
    if not data_path.is_file():
        sys.exit(f"no data at {data_path}; see ../shared/data/README.md")
    a.torchao_version, why = torchao_available() if a.torchao == "on" else (None, "--torchao off")
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    res = {"config": {k: v for k, v in vars(a).items() if k != "out"}, "machine": {
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": sys.platform},
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if a.micro_only or a.torchao_version:
        if a.torchao_version is None:
            sys.exit(f"--micro-only needs torchao (make torchao): {why}")
        micro, grid = fake_quant_microbench(a.group_size, reps=50 if a.micro_only else 20)
        res["torchao"] = {"version": a.torchao_version, "group_size": a.group_size, "fake_quant_op_ms": micro,
                          "fake_quant_op_speedup": micro["torchao"] / micro["qft"], "grid_vs_gptq_export": grid}
        log(f"fake-quant fwd+bwd (4 shapes): qft {micro['qft']:.2f} ms, torchao {micro['torchao']:.2f} ms")
        if a.micro_only:
            write_result(out, res)
            return
    else:
        res["torchao"] = {"skipped": why}

    tok = load_tokenizer(a.model)
    train_ids, val_ids = split_tokens(data_path, tok)
    data = batches(train_ids, a.steps, a.batch_size, a.seq_len, a.seed)
    calib = torch.cat(batches(train_ids, a.calib_windows, 1, a.seq_len, a.seed + 1))
    n_windows = max(1, a.eval_tokens // a.seq_len)
    a.ppl = lambda m: perplexity(m, val_ids, seq_len=a.seq_len, max_windows=n_windows)  # noqa: E731
    probe = val_ids[: a.seq_len].unsqueeze(0)
    res.update(train_tokens=a.steps * a.batch_size * a.seq_len, eval_tokens=n_windows * a.seq_len)

    arms = make_arms(a)
    res["pretrained_ppl"] = a.ppl(arms["plain"][0])
    log(f"pretrained ppl {res['pretrained_ppl']:.3f}; arms {list(arms)}")
    from qft.module import bf16_supported

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.compute_dtype) or \
        (torch.bfloat16 if bf16_supported(torch.device("cpu")) else torch.float32)
    res["compute_dtype"] = str(dtype).replace("torch.", "")
    solves = {}

    def solver(name):
        def fn(arms):
            model = arms[name][0]
            scheme = scheme_for(4, a.group_size)
            solves[name] = solve_and_install(model, scheme, GridSolve(n_samples=a.calib_windows, seq_len=a.seq_len),
                                             calib, None)
            set_state(model, enabled=True, observing=False)
            log(f"{name}: grid solved ({solves[name]})")
        return fn

    before = {}
    for name, step in a.solved.items():
        before.setdefault(step, []).append(solver(name))
    run = train_lockstep(arms, data, log, dtype, before)
    med = {k: statistics.median(v) for k, v in run["times"].items()}
    res["step_s"] = med
    res["step_times_s"] = run["times"]
    res["train_loss_last10"] = {k: statistics.mean(v[-10:]) for k, v in run["losses"].items()}
    res["step_time_ratio"] = {k: v / med["plain"] for k, v in med.items() if k != "plain"}
    for name, step in a.solved.items():  # over the steps on the grid only
        t = run["times"]
        res["step_time_ratio"][name] = statistics.median(t[name][step:]) / statistics.median(t["plain"][step:])
    log("step time vs plain (median of interleaved steps): "
        + ", ".join(f"{k} {v:.3f}" for k, v in res["step_time_ratio"].items()))
    if a.step_time_only:
        res["wall_s"] = time.perf_counter() - t_start
        write_result(out, res)
        return
    plain = arms.pop("plain")[0]
    fp_ppl = res["fp_ppl"] = a.ppl(plain)
    log(f"plain: fp ppl {fp_ppl:.3f}, median step {med['plain']:.2f}s")
    trained = {k: v.clone() for k, v in plain.state_dict().items()}
    del plain

    for bits in a.bits:
        model = arms.pop(f"qat_int{bits}")[0]
        model.eval()
        after = gptq_after_qat(model, a, bits, calib, log) if a.gptq_after else None
        with torch.no_grad():
            fq_logits = model(input_ids=probe).logits
        convert(model)
        with torch.no_grad():
            diff = (model(input_ids=probe).logits - fq_logits).abs().max().item()
        qat_ppl = a.ppl(model)
        del model
        base = ptq(trained, a, bits, calib, log)
        r = {"fp_ppl": fp_ppl, "ptq_ppl": base["rtn"], "ptq_gptq_ppl": base["gptq"], "gptq_s": base["gptq_s"],
             "qat_ppl": qat_ppl,
             "recovered": (base["rtn"] - qat_ppl) / (base["rtn"] - fp_ppl),
             "recovered_vs_gptq": (base["gptq"] - qat_ppl) / (base["gptq"] - fp_ppl),
             "step_time_ratio": res["step_time_ratio"][f"qat_int{bits}"], "convert_max_abs_logit_diff": diff,
             **({"gptq_after_qat": after} if after else {}),
             "scheme": scheme_for(bits, a.group_size).to_dict(), "scale_init": a.scale_init,
             "scale_lr_mult": a.scale_lr_mult}
        res[f"int{bits}"] = r
        log(f"QAT int{bits}: ppl {qat_ppl:.3f}, recovered {r['recovered']:.3f} (vs GPTQ {r['recovered_vs_gptq']:.3f}), "
            f"step ratio {r['step_time_ratio']:.3f}, convert diff {diff:.2e}")

    for name in [*a.lsq, *a.solved]:  # the extra int4 arms, against the int4 PTQ of the plain fine-tune
        model = arms.pop(name)[0]
        model.eval()
        with torch.no_grad():
            fq_logits = model(input_ids=probe).logits
        convert(model)
        with torch.no_grad():
            diff = (model(input_ids=probe).logits - fq_logits).abs().max().item()
        qat_ppl = a.ppl(model)
        del model
        ref = res["int4"]
        extra = {"scale_lr_mult": a.lsq[name][0], "scale_init": a.lsq[name][1]} if name in a.lsq else {
                     "solve_step": a.solved[name],
                                                                        "solve": solves[name]}
        res[name] = {**extra, "qat_ppl": qat_ppl,
                     "recovered": (ref["ptq_ppl"] - qat_ppl) / (ref["ptq_ppl"] - fp_ppl),
                     "recovered_vs_gptq": (ref["ptq_gptq_ppl"] - qat_ppl) / (ref["ptq_gptq_ppl"] - fp_ppl),
                     "step_time_ratio": res["step_time_ratio"][name], "convert_max_abs_logit_diff": diff}
        log(f"{name}: ppl {qat_ppl:.3f}, recovered {res[name]['recovered']:.3f} "
            f"(vs GPTQ {res[name]['recovered_vs_gptq']:.3f}), step ratio {res[name]['step_time_ratio']:.3f}")

    if "torchao_int4" in arms:
        model = arms.pop("torchao_int4")[0]
        fq = a.ppl(model)  # torchao's own fake-quant numerics
        exported = load_model(a.model)  # its trained weights on the GPTQ grid qft writes
        exported.load_state_dict(model.state_dict(), strict=False)
        del model
        prepare(exported, qat_config(4, a.group_size))
        convert(exported)
        ppl_exported = a.ppl(exported)
        ref = res.get("int4", {})
        res["torchao"]["int4"] = {
            "fake_quant_ppl": fq, "exported_ppl": ppl_exported,
            "recovered": (ref["ptq_ppl"] - ppl_exported) / (ref["ptq_ppl"] - fp_ppl) if ref else None,
            "step_time_ratio": res["step_time_ratio"]["torchao_int4"]}
        log(f"torchao int4 g{a.group_size}: {res['torchao']['int4']}")
    res["wall_s"] = time.perf_counter() - t_start
    res["peak_rss_mb"] = rss_mb()

    print(f"\n{'arm':>14} {'fp':>8} {'PTQ RTN':>8} {'PTQ GPTQ':>9} {'QAT':>8} "
          f"{'recovered':>9} {'vs GPTQ':>8} {'step x':>7}")
    for bits in a.bits:
        r = res[f"int{bits}"]
        print(f"{'qft int' + str(bits):>14} {r['fp_ppl']:8.3f} {r['ptq_ppl']:8.3f} {r['ptq_gptq_ppl']:9.3f} "
              f"{r['qat_ppl']:8.3f} {r['recovered']:9.3f} {r['recovered_vs_gptq']:8.3f} {r['step_time_ratio']:7.3f}")
    for name in [*a.lsq, *a.solved]:
        r, ref = res[name], res["int4"]
        print(f"{name:>14} {ref['fp_ppl']:8.3f} {ref['ptq_ppl']:8.3f} {ref['ptq_gptq_ppl']:9.3f} {r['qat_ppl']:8.3f} "
              f"{r['recovered']:9.3f} {r['recovered_vs_gptq']:8.3f} {r['step_time_ratio']:7.3f}")
    t = res["torchao"]
    if "int4" in t:
        r = t["int4"]
        print(f"{'torchao int4':>14} {fp_ppl:8.3f} {res['int4']['ptq_ppl']:8.3f} {res['int4']['ptq_gptq_ppl']:9.3f} "
              f"{r['exported_ppl']:8.3f} {r['recovered']:9.3f} {'':>8} {r['step_time_ratio']:7.3f}"
              f"   (torchao fake-quant ppl {r['fake_quant_ppl']:.3f})")
    if "fake_quant_op_ms" in t:
        print(f"int4 g{t['group_size']} weight fake-quant fwd+bwd: qft {t['fake_quant_op_ms']['qft']:.2f} ms, torchao "
              f"{t['fake_quant_op_ms']['torchao']:.2f} ms ({t['fake_quant_op_speedup']:.2f}x)")
    print(f"wall {res['wall_s']:.0f}s, peak RSS {res['peak_rss_mb']:.0f} MB")
    res["config"].pop("ppl", None)
    write_result(out, res)


if __name__ == "__main__":
    main()
