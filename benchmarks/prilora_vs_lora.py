"""LoRA (uniform r=8) vs PRILoRA (ranks 4->12, pruned A) vs AdaLoRA on an NF4 base, plus base-weight memory.

    python benchmarks/prilora_vs_lora.py --out F.json [--steps 60 --batch-size 8 ...]

Part 1 (methods): the same NF4 base (``--model``, default smollm2-135m), seed, steps, learning rate and
batches for each method, trained on qft's synthetic addition task (``QFTDataModule(task="synthetic")``):

- ``lora``: ``CausalLMModule(adapter="lora", lora_r=8, lora_alpha=16)`` on every linear layer;
- ``prilora``: the same module plus ``PRILoRACallback(r_start=4, r_end=12)`` (mean rank 8, so the same
  trainable parameter count) with its default pruning schedule (A pruned to 50% per row between 10% and
  80% of the run, cubic, every ``--interval`` steps);
- ``adalora``: peft AdaLoRA at the same final budget: ``init_r=12`` shrinking to ``target_r=8`` on
  average, with the same warm-up/final fractions and interval as PRILoRA, and ``lora_alpha=24`` so the
  initial alpha/r equals LoRA's 2.

Per method: ``trainable_params``, ``nonzero_adapter_params_at_end`` (nonzero entries of the adapter
tensors), ``effective_adapter_params_at_end`` (AdaLoRA: A rows / B columns of ranks whose singular value
was masked to 0 do not count), ``eval_loss`` (token-mean CE on the held-out problems' answers),
``eval_accuracy`` (greedy exact match, ``qft.metrics.generation_accuracy``), ``step_time_s`` (median
optimizer-step wall time), ``peak_rss_mb`` and Tiny Shakespeare held-out perplexity when
``../shared/data/tinyshakespeare.txt`` exists (a forgetting check: nothing trains on it).

Part 2 (bases): bf16 base + LoRA, NF4 + LoRA, NF4-DQ + LoRA, each trained ``--mem-steps`` steps:
``weight_bytes`` (model parameters, buffers and quantisation state, adapters included),
``decoder_linear_weight_bytes`` (the frozen decoder-layer linear weights alone: what NF4 compresses), ``peak_rss_mb``, ``rss_mb_end``.

Every method and base runs in its own subprocess so peak RSS is its own. Results are printed as a
table and written (temp file + rename; an existing ``--out`` is never overwritten) as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"
METHODS = ("lora", "prilora", "adalora")
BASES = ("bf16", "nf4", "nf4-dq")


# ---------------------------------------------------------------------------- worker side
def _rss_mb() -> tuple[float, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cur = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024.0
    return peak, cur


def _modules(spec):
    """The benchmark's LightningModules; defined lazily so the parent process never imports torch."""
    import torch

    from qft import models
    from qft.module import CausalLMModule
    from qft.qlora import quantize_nf4

    class AdaLoRAModule(CausalLMModule):
        """CausalLMModule with peft AdaLoRA instead of LoRA (benchmark only)."""

        def configure_model(self):
            if self.model_ready:
                return
            from peft import AdaLoraConfig, get_peft_model

            hp = self.hparams
            self.model = models.load_model(hp.model, dtype=torch.float32, seed=hp.seed)
            self.tokenizer = models.load_tokenizer(hp.model)
            quantize_nf4(self.model, double_quant=hp.quantization == "nf4-dq", compute_dtype=self.compute_dtype)
            cfg = AdaLoraConfig(init_r=spec["r_end"], target_r=spec["lora_r"], lora_alpha=2 * spec["r_end"],
                                target_modules="all-linear", total_step=spec["steps"], tinit=spec["tinit"],
                                tfinal=spec["tfinal"], deltaT=spec["interval"], task_type="CAUSAL_LM")
            self.model = get_peft_model(self.model, cfg)
            self.model_ready = True

    class BF16LoRAModule(CausalLMModule):
        """LoRA on a bf16 base loaded directly in bf16 (no fp32 copy), for the memory comparison."""

        def configure_model(self):
            if self.model_ready:
                return
            from peft import LoraConfig, get_peft_model

            hp = self.hparams
            self.model = models.load_model(hp.model, dtype=torch.bfloat16, seed=hp.seed)
            self.tokenizer = models.load_tokenizer(hp.model)
            self.model = get_peft_model(self.model, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
            self.model_ready = True

    return AdaLoRAModule, BF16LoRAModule


def _adapter_counts(model) -> dict:
    """Nonzero adapter entries, and for AdaLoRA the entries of ranks still alive (E != 0)."""
    import torch
    from peft.tuners.lora import LoraLayer

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    effective = 0
    for m in model.modules():
        if not isinstance(m, LoraLayer):
            continue
        for name in m.lora_A:
            a, b = m.lora_A[name], m.lora_B[name]
            a = a.weight if hasattr(a, "weight") else a
            b = b.weight if hasattr(b, "weight") else b
            e = getattr(m, "lora_E", {}).get(name) if hasattr(m, "lora_E") else None
            if e is not None:  # AdaLoRA: A [r,in], B [out,r], E [r,1]
                alive = (e.detach().reshape(-1) != 0)
                effective += int((a.detach()[alive] != 0).sum()) + int((b.detach()[:, alive] != 0).sum()) + int(alive.sum())
            else:
                effective += int((a.detach() != 0).sum()) + int((b.detach() != 0).sum())
    return {"trainable_params": trainable, "nonzero_adapter_params_at_end": nonzero,
            "effective_adapter_params_at_end": effective or nonzero}


def _weight_bytes(model) -> int:
    """Bytes of every parameter and buffer plus bitsandbytes' quantisation state (absmax, code, metadata),
    each tensor once (a peft LoRA wrapper exposes its base layer's weight as ``.weight`` too)."""
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    states = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None and id(w) not in states:
            states.add(id(w))
            total += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values() if hasattr(v, "numel"))
    return total


def _linear_bytes(model) -> int:
    """Bytes of the frozen base weights of the decoder-layer linears (packed NF4 + quant state, or bf16)."""
    total, seen = 0, set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)  # a peft LoRA wrapper exposes its base layer's weight too: count it once
        if ".layers." not in name or "lora_" in name or w is None or w.requires_grad or w.dim() != 2 or id(w) in seen:
            continue
        seen.add(id(w))
        total += w.numel() * w.element_size()
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values() if hasattr(v, "numel"))
    return total


def _eval_loss(module, loader) -> float:
    import torch

    model, dt = module.model, module.compute_dtype
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def _shakespeare_ppl(module, seq_len: int, windows: int):
    import math

    import torch

    if not SHAKESPEARE.is_file():
        return None
    text = SHAKESPEARE.read_text()
    held = text[int(0.9 * len(text)):]  # the shared data README's held-out split
    ids = module.tokenizer(held)["input_ids"]
    n = min(windows, len(ids) // seq_len)
    model, dt = module.model, module.compute_dtype
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
        for i in range(n):
            x = torch.tensor([ids[i * seq_len:(i + 1) * seq_len]])
            out = model(input_ids=x)
            logits = out.logits.float()[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            count += x.shape[1] - 1
    return math.exp(total / count)


def run_worker(spec: dict) -> dict:
    import pytorch_lightning as pl
    import torch

    from qft.data import QFTDataModule
    from qft.metrics import generation_accuracy
    from qft.module import CausalLMModule
    from qft.prilora import PRILoRACallback

    torch.set_num_threads(spec["threads"])
    pl.seed_everything(spec["seed"], verbose=False)
    AdaLoRAModule, BF16LoRAModule = _modules(spec)
    kind, name = spec["kind"], spec["name"]
    common = dict(model=spec["model"], adapter="lora", lora_r=spec["lora_r"], lora_alpha=2.0 * spec["lora_r"],
                  lr=spec["lr"], seed=spec["seed"], warmup_steps=spec["warmup"])
    callbacks = []
    prilora = None
    if kind == "method":
        if name == "adalora":
            module = AdaLoRAModule(quantization=spec["quantization"], **common)
        else:
            module = CausalLMModule(quantization=spec["quantization"], **common)
        if name == "prilora":
            prilora = PRILoRACallback(r_start=spec["r_start"], r_end=spec["r_end"], interval=spec["interval"],
                                      final_sparsity=spec["final_sparsity"], start_step=spec["tinit"],
                                      end_step=spec["steps"] - spec["tfinal"], plot=False, log=False)
            callbacks.append(prilora)
        steps = spec["steps"]
    else:
        module = BF16LoRAModule(quantization="none", compute_dtype="bfloat16", **common) if name == "bf16" \
            else CausalLMModule(quantization=name, **common)
        steps = spec["mem_steps"]

    class AdaLoRAUpdate(pl.Callback):
        """AdaLoRA's budget step: after the optimizer step, before the next zero_grad (grads still present)."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            pl_module.model.base_model.update_and_allocate(trainer.global_step)

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times, self.cpu, self.losses, self._t = [], [], [], None

        def on_train_batch_start(self, *args):
            self._t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            self.times.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.process_time() - self._t[1])
            self.losses.append(float(outputs["loss"]))
            print(f"step {trainer.global_step}: loss {self.losses[-1]:.4f} "
                  f"wall {self.times[-1]:.2f}s cpu {self.cpu[-1]:.2f}s", flush=True)

    if kind == "method" and name == "adalora":
        callbacks.append(AdaLoRAUpdate())
    timer = StepTimer()
    callbacks.append(timer)  # last, so a step's time includes the other callbacks' batch-end work
    dm = QFTDataModule(task="synthetic", tokenizer=spec["model"], seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                       num_train=max(steps * spec["batch_size"], 8), num_val=spec["num_eval"], seed=spec["seed"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=spec["workdir"])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    result = {"name": name, "steps": trainer.global_step, "train_time_s": time.perf_counter() - t0,
              "step_time_s": statistics.median(timer.times), "step_cpu_s": statistics.median(timer.cpu), "train_loss_last5": statistics.mean(timer.losses[-5:]),
              "compute_dtype": str(module.compute_dtype).replace("torch.", "")}
    result.update(_adapter_counts(module.model))
    if kind == "method":
        result["eval_loss"] = _eval_loss(module, dm.val_dataloader())
        result["eval_accuracy"] = generation_accuracy(module.model, module.tokenizer,
                                                      [p["messages"] for p in dm.val_problems],
                                                      dtype=module.compute_dtype)
        result["shakespeare_ppl"] = _shakespeare_ppl(module, spec["ppl_seq_len"], spec["ppl_windows"])
        if prilora is not None:
            result["prilora_layers"] = prilora.layer_report()
        if name == "adalora":
            pattern = module.model.peft_config["default"].rank_pattern or {}
            result["adalora_final_rank_total"] = int(sum(sum(v) if isinstance(v, list) else int(v)
                                                         for v in pattern.values()))
    else:
        result["weight_bytes"] = _weight_bytes(module.model)
        result["decoder_linear_weight_bytes"] = _linear_bytes(module.model)
    result["peak_rss_mb"], result["rss_mb_end"] = _rss_mb()
    return result


# ---------------------------------------------------------------------------- parent side
def _spawn(spec: dict, log_dir: Path) -> dict:
    res_path = log_dir / f"{spec['kind']}-{spec['name']}.json"
    spec = dict(spec, result_path=str(res_path))
    log = log_dir / f"{spec['kind']}-{spec['name']}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT,
                              cwd=str(ROOT))
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{spec['kind']} {spec['name']} failed (rc={proc.returncode}); log tail:\n{tail}")
    out = json.loads(res_path.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON result path (must not exist)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "nf4-dq"], help="base of the method comparison")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--bases", default=",".join(BASES), help="bases of the memory comparison ('' to skip)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    p.add_argument("--mem-steps", type=int, default=5, help="training steps per base in the memory comparison")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="truncation length of the task's chat examples")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (AdamW + cosine from CausalLMModule)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--r-start", type=int, default=4)
    p.add_argument("--r-end", type=int, default=12)
    p.add_argument("--final-sparsity", type=float, default=0.5)
    p.add_argument("--interval", type=int, default=None, help="pruning / AdaLoRA allocation interval (default steps//12)")
    p.add_argument("--num-eval", type=int, default=64, help="held-out problems for eval loss and accuracy")
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at once (>1 shares the CPU between methods)")
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = run_worker(spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0
    if not args.out:
        p.error("--out is required")
    out = Path(args.out)
    if out.exists():
        p.error(f"--out {out} exists; results are never overwritten. Pick a new name.")
    methods = [m for m in args.methods.split(",") if m]
    bases = [b for b in args.bases.split(",") if b]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: {m!r} is not one of {list(METHODS)}")
    for b in bases:
        if b not in BASES:
            p.error(f"--bases: {b!r} is not one of {list(BASES)}")
    if args.steps < 5:
        p.error(f"--steps {args.steps}: need at least 5 for the pruning / AdaLoRA schedules")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be >= 1")
    interval = args.interval or max(1, args.steps // 12)
    spec = dict(model=args.model, quantization=args.quantization, steps=args.steps, mem_steps=args.mem_steps,
                batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, lora_r=args.lora_r,
                r_start=args.r_start, r_end=args.r_end, final_sparsity=args.final_sparsity, interval=interval,
                tinit=max(1, args.steps // 10), tfinal=max(1, args.steps // 5), num_eval=args.num_eval,
                ppl_seq_len=args.ppl_seq_len, ppl_windows=args.ppl_windows, threads=args.threads, seed=args.seed,
                jobs=args.jobs)
    t_start = time.time()
    results = {"methods": {}, "bases": {}}
    with tempfile.TemporaryDirectory(prefix="prilora-bench-") as tmp:
        tmp = Path(tmp)
        jobs = [("methods", dict(spec, kind="method", name=m, workdir=str(tmp / m))) for m in methods]
        jobs += [("bases", dict(spec, kind="base", name=b, workdir=str(tmp / b))) for b in bases]
        # --jobs > 1 runs subprocesses side by side: peak RSS stays per process, but they share the CPU.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = []
            for group, job in jobs:
                print(f"[prilora_vs_lora] {group} {job['name']} ...", flush=True)
                futures.append((group, job["name"], pool.submit(_spawn, job, tmp)))
            for group, name, fut in futures:
                results[group][name] = fut.result()

    ref = results["methods"].get("lora")
    for r in results["methods"].values():
        if ref:
            for k in ("trainable_params", "nonzero_adapter_params_at_end", "step_time_s", "step_cpu_s", "peak_rss_mb"):
                r[f"{k}_vs_lora"] = r[k] / ref[k] if ref[k] else None
    bref = results["bases"].get("bf16")
    for r in results["bases"].values():
        if bref:
            r["weight_bytes_vs_bf16"] = r["weight_bytes"] / bref["weight_bytes"]
            r["decoder_linear_weight_bytes_vs_bf16"] = r["decoder_linear_weight_bytes"] / bref["decoder_linear_weight_bytes"]
            r["peak_rss_mb_vs_bf16"] = r["peak_rss_mb"] / bref["peak_rss_mb"]
    results["settings"] = dict(spec, command=shlex.join(["python", "benchmarks/prilora_vs_lora.py"] + (argv if argv is not None else sys.argv[1:])),
                               machine=f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
                               shakespeare=SHAKESPEARE.is_file(), total_wall_s=time.time() - t_start)

    if results["methods"]:
        rows = [dict(method=k, **v) for k, v in results["methods"].items()]
        print(_table(rows, ["method", "trainable_params", "nonzero_adapter_params_at_end",
                            "effective_adapter_params_at_end", "eval_loss", "eval_accuracy", "shakespeare_ppl",
                            "step_time_s", "step_cpu_s", "peak_rss_mb", "train_loss_last5"]))
    if results["bases"]:
        rows = [dict(base=k, **v) for k, v in results["bases"].items()]
        print(_table(rows, ["base", "weight_bytes", "weight_bytes_vs_bf16", "decoder_linear_weight_bytes", "peak_rss_mb",
                            "rss_mb_end", "step_time_s", "step_cpu_s"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_out = tempfile.mkstemp(prefix=".prilora-bench-", suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    if out.exists():
        os.unlink(tmp_out)
        raise SystemExit(f"{out} appeared while the benchmark ran; result left unwritten.")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
