"""LoRA (uniform r=8) vs PRILoRA (ranks 4->12, pruned A) vs AdaLoRA on an NF4 base, with PRILoRA's ablations.

    python benchmarks/prilora_vs_lora.py --out F.json [--tasks synthetic,shakespeare] [--seeds 0,1,2]
        [--methods lora,prilora,prilora_schedule,prilora_prune,adalora] [--steps 100 --batch-size 16 ...]

Every run: SmolLM2-135M (``--model``) on an NF4 base (bitsandbytes Linear4bit on every linear but
``lm_head``), adapters on all linear layers, AdamW with the same learning rate, warm-up and cosine decay,
the same batches for every method at a given seed (the seed also sets the adapter init and, for the
synthetic task, the problem split), so per-seed differences between methods are paired.

Methods, all at LoRA r=8's trainable budget or above:

- ``lora``: ``CausalLMModule(adapter="lora", lora_r=8, lora_alpha=16)``;
- ``prilora``: the same plus ``PRILoRACallback(r_start=4, r_end=12)``: ranks grow linearly with depth
  (mean 8, the same trainable count) and each row of A is pruned by importance |A_ij| * ||x_j|| to
  ``--final-sparsity`` between ``--prune-start`` and ``--prune-end`` of the run (cubic, every ``--interval``);
- ``prilora_schedule`` (ablation): the rank schedule alone, no pruning;
- ``prilora_prune`` (ablation): uniform r=8 with PRILoRA's pruning alone;
- ``adalora``: peft AdaLoRA at the same final budget (``init_r=12`` shrinking to ``target_r=8``), the same
  warm-up/final fractions and interval, ``lora_alpha=24`` so that alpha/r starts at LoRA's 2.

Tasks:

- ``synthetic``: qft's 3-digit addition chats (``QFTDataModule(task="synthetic")``); ``eval_loss`` is the
  token-mean CE on the held-out problems' answers, ``eval_accuracy`` greedy exact match on them;
- ``shakespeare``: ``../shared/data/tinyshakespeare.txt`` as plain text in ``--text-seq-len`` blocks, the
  first 90% of characters for training, the last 10% held out (the data README's split); ``eval_loss`` is
  the token-mean CE over the first ``--text-eval-blocks`` held-out blocks (``eval_ppl`` = exp).

Per run: ``eval_loss``, ``eval_accuracy`` (synthetic), ``trainable_params``, ``nonzero_adapter_params_at_end``
(nonzero entries of the adapter tensors; AdaLoRA's ``effective`` counts only ranks still alive),
``step_time_s`` (median optimizer-step wall time), ``step_cpu_s`` and ``peak_rss_mb`` (each run is its own
subprocess, so the peak is its own). Per task and method: the mean and the sample standard deviation over
seeds, and ratios to LoRA (of the means; ``eval_loss_paired_ratio`` is the mean of the per-seed ratios).

Runs one after another (never side by side: the timings would mix). The result is written through a
temporary file and a rename; an existing ``--out`` is never overwritten. Every finished run is also kept in
``--out``'s ``.runs/`` folder, so a killed benchmark started again with the same arguments resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"
METHODS = ("lora", "prilora", "prilora_schedule", "prilora_prune", "adalora")
TASKS = ("synthetic", "shakespeare")


# ---------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _adalora_module(spec):
    """CausalLMModule with peft AdaLoRA instead of LoRA (benchmark only); defined lazily (torch import)."""
    import torch

    from qft import models
    from qft.module import CausalLMModule
    from qft.qlora import quantize_nf4

    class AdaLoRAModule(CausalLMModule):
        def configure_model(self):
            if self.model_ready:
                return
            from peft import AdaLoraConfig, get_peft_model

            hp = self.hparams
            self.model = models.load_model(hp.model, dtype=torch.float32, seed=hp.seed)
            self.model.set_attn_implementation(hp.attention)  # as CausalLMModule does
            self.tokenizer = models.load_tokenizer(hp.model)
            quantize_nf4(self.model, double_quant=hp.quantization == "nf4-dq", compute_dtype=self.compute_dtype)
            cfg = AdaLoraConfig(init_r=spec["r_end"], target_r=spec["lora_r"], lora_alpha=2 * spec["r_end"],
                                target_modules="all-linear", total_step=spec["steps"], tinit=spec["prune_start_step"],
                                tfinal=spec["steps"] - spec["prune_end_step"], deltaT=spec["interval"],
                                task_type="CAUSAL_LM")
            self.model = get_peft_model(self.model, cfg)
            self.model_ready = True

    return AdaLoRAModule


def _adapter_counts(model) -> dict:
    """Trainable and nonzero adapter entries, and for AdaLoRA the entries of ranks still alive (E != 0)."""
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
                effective += (int((a.detach()[alive] != 0).sum()) + int((b.detach()[:, alive] != 0).sum())
                              + int(alive.sum()))
            else:
                effective += int((a.detach() != 0).sum()) + int((b.detach() != 0).sum())
    return {"trainable_params": trainable, "nonzero_adapter_params_at_end": nonzero,
            "effective_adapter_params_at_end": effective or nonzero}


def _eval_loss(module, loader) -> float:
    """Token-mean cross-entropy over the labelled positions of ``loader``."""
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


def _prilora_callback(spec):
    from qft.prilora import PRILoRACallback

    method = spec["method"]
    r_start, r_end = (spec["lora_r"], spec["lora_r"]) if method == "prilora_prune" else (spec["r_start"], spec["r_end"])
    sparsity = 0.0 if method == "prilora_schedule" else spec["final_sparsity"]
    return PRILoRACallback(r_start=r_start, r_end=r_end, interval=spec["interval"], final_sparsity=sparsity,
                           start_step=spec["prune_start_step"], end_step=spec["prune_end_step"], plot=False, log=False)


def run_worker(spec: dict) -> dict:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from qft.data import QFTDataModule
    from qft.metrics import generation_accuracy
    from qft.module import CausalLMModule

    torch.set_num_threads(spec["threads"])
    pl.seed_everything(spec["seed"], verbose=False)
    method, task = spec["method"], spec["task"]
    common = dict(model=spec["model"], quantization=spec["quantization"], adapter="lora", lora_r=spec["lora_r"],
                  lora_alpha=2.0 * spec["lora_r"], lr=spec["lr"], seed=spec["seed"], warmup_steps=spec["warmup"],
                  attention=spec["attention"])
    module = _adalora_module(spec)(**common) if method == "adalora" else CausalLMModule(**common)
    callbacks, prilora = [], None
    if method.startswith("prilora"):
        prilora = _prilora_callback(spec)
        callbacks.append(prilora)

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
            if trainer.global_step % 10 == 0:
                print(f"step {trainer.global_step}: loss {self.losses[-1]:.4f} wall {self.times[-1]:.2f}s", flush=True)

    if method == "adalora":
        callbacks.append(AdaLoRAUpdate())
    timer = StepTimer()
    callbacks.append(timer)  # last, so a step's time includes the other callbacks' batch-end work
    steps, bs = spec["steps"], spec["batch_size"]
    if task == "synthetic":
        dm = QFTDataModule(task="synthetic", tokenizer=spec["model"], seq_len=spec["seq_len"], batch_size=bs,
                           num_train=steps * bs, num_val=spec["num_eval"], seed=spec["seed"])
    else:
        dm = QFTDataModule(task="text", path=str(SHAKESPEARE), tokenizer=spec["model"], seq_len=spec["text_seq_len"],
                           batch_size=bs, val_fraction=0.1, seed=spec["seed"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=spec["workdir"])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    result = {"task": task, "method": method, "seed": spec["seed"], "steps": trainer.global_step,
              "train_time_s": time.perf_counter() - t0, "step_time_s": statistics.median(timer.times),
              "step_cpu_s": statistics.median(timer.cpu), "train_loss_last10": statistics.mean(timer.losses[-10:]),
              "compute_dtype": str(module.compute_dtype).replace("torch.", "")}
    result.update(_adapter_counts(module.model))
    if task == "synthetic":
        result["eval_loss"] = _eval_loss(module, dm.val_dataloader())
        result["eval_accuracy"] = generation_accuracy(module.model, module.tokenizer,
                                                      [p["messages"] for p in dm.val_problems],
                                                      dtype=module.compute_dtype)
    else:
        blocks = dm.val_set[: spec["text_eval_blocks"]]
        loader = DataLoader(blocks, batch_size=8, collate_fn=dm.val_dataloader().collate_fn)
        result["eval_loss"] = _eval_loss(module, loader)
        result["eval_ppl"] = math.exp(result["eval_loss"])
        result["eval_tokens"] = len(blocks) * (spec["text_seq_len"] - 1)
    if prilora is not None:
        report = prilora.layer_report()
        result["ranks"] = [row["rank"] for row in report]
        result["a_sparsity_mean"] = statistics.mean(row["sparsity"] for row in report)
    if method == "adalora":
        pattern = module.model.peft_config["default"].rank_pattern or {}
        result["adalora_final_rank_total"] = int(sum(sum(v) if isinstance(v, list) else int(v)
                                                     for v in pattern.values()))
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# ---------------------------------------------------------------------------- parent side
def _spawn(spec: dict, runs_dir: Path) -> dict:
    """One run in its own subprocess; a finished run's JSON in ``runs_dir`` is reused (resume)."""
    tag = f"{spec['task']}-{spec['method']}-seed{spec['seed']}"
    res_path = runs_dir / f"{tag}.json"
    if res_path.is_file():
        kept = json.loads(res_path.read_text())
        if kept.get("spec") != spec:
            raise SystemExit(f"{res_path} was run with other settings; pass a new --out (or delete that folder).")
        print(f"[prilora_vs_lora] {tag}: kept from an earlier start", flush=True)
        return kept
    log = runs_dir / f"{tag}.log"
    tmp_res = runs_dir / f".{tag}.json.tmp"
    with tempfile.TemporaryDirectory(prefix="prilora-bench-") as work:
        spec = dict(spec, result_path=str(tmp_res), workdir=work)
        print(f"[prilora_vs_lora] {tag} ...", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=f,
                                  stderr=subprocess.STDOUT, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed (rc={proc.returncode}); log tail:\n{log.read_text()[-3000:]}")
    out = json.loads(tmp_res.read_text())
    out["wall_s"] = time.perf_counter() - t0
    out["spec"] = {k: v for k, v in spec.items() if k not in ("result_path", "workdir")}
    tmp_res.write_text(json.dumps(out))
    os.replace(tmp_res, res_path)
    print(f"[prilora_vs_lora] {tag}: eval_loss {out['eval_loss']:.4f} acc {out.get('eval_accuracy', '-')} "
          f"step {out['step_time_s']:.2f}s wall {out['wall_s']:.0f}s", flush=True)
    return out


SUMMARY_KEYS = ("eval_loss", "eval_accuracy", "eval_ppl", "nonzero_adapter_params_at_end",
                "effective_adapter_params_at_end", "trainable_params", "a_sparsity_mean", "step_time_s", "step_cpu_s",
                "peak_rss_mb")


def summarize(runs: list[dict]) -> dict:
    """Per task and method: mean and sample std over seeds, and ratios to LoRA's means (paired for eval loss)."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["task"], {}).setdefault(r["method"], {"seeds": []})["seeds"].append(r)
    for task, methods in out.items():
        for method, agg in methods.items():
            for k in SUMMARY_KEYS:
                vals = [r[k] for r in agg["seeds"] if r.get(k) is not None]
                if vals:
                    agg[f"{k}_mean"] = statistics.mean(vals)
                    agg[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ref = methods.get("lora")
        if not ref:
            continue
        by_seed = {r["seed"]: r for r in ref["seeds"]}
        for method, agg in methods.items():
            for k in ("eval_loss", "nonzero_adapter_params_at_end", "step_time_s", "peak_rss_mb"):
                if ref.get(f"{k}_mean"):
                    agg[f"{k}_vs_lora"] = agg[f"{k}_mean"] / ref[f"{k}_mean"]
            paired = [r["eval_loss"] / by_seed[r["seed"]]["eval_loss"] for r in agg["seeds"] if r["seed"] in by_seed]
            if paired:
                agg["eval_loss_paired_ratio"] = statistics.mean(paired)
        for agg in methods.values():
            agg["seeds"] = [r["seed"] for r in agg["seeds"]]
    return out


def _fmt(mean, std, digits=4):
    if mean is None:
        return "-"
    return f"{mean:.{digits}g} ± {std:.2g}" if std else f"{mean:.{digits}g}"


def table(summary: dict) -> str:
    lines = []
    for task, methods in summary.items():
        lines.append(f"\n{task}")
        lines.append("| method | eval loss | vs LoRA (paired) | accuracy | nonzero adapter params | A sparsity | "
                     "step s | peak RSS MB |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for m, a in methods.items():
            lines.append(
                f"| {m} | {_fmt(a.get('eval_loss_mean'), a.get('eval_loss_std'))} | "
                f"{a.get('eval_loss_paired_ratio', float('nan')):.4f} | "
                f"{_fmt(a.get('eval_accuracy_mean'), a.get('eval_accuracy_std'), 3)} | "
                f"{a.get('nonzero_adapter_params_at_end_mean', 0):,.0f} | {a.get('a_sparsity_mean_mean', 0):.2f} | "
                f"{_fmt(a.get('step_time_s_mean'), a.get('step_time_s_std'), 3)} | "
                f"{a.get('peak_rss_mb_mean', 0):.0f} |")
    return "\n".join(lines)


def _list(p, flag: str, value: str, allowed, cast=str) -> list:
    try:
        items = [cast(v) for v in value.split(",") if v]
    except ValueError:
        p.error(f"{flag} {value!r}: expected a comma list, e.g. {','.join(map(str, allowed))}")
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        p.error(f"{flag} {value!r}: allowed values are {list(allowed)}")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON result path (must not exist)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "nf4-dq"], help="the frozen base")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="truncation length of the synthetic chats")
    p.add_argument("--text-seq-len", type=int, default=128, help="Shakespeare block length")
    p.add_argument("--text-eval-blocks", type=int, default=64, help="held-out Shakespeare blocks for eval_loss")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (AdamW + cosine from CausalLMModule)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--r-start", type=int, default=4)
    p.add_argument("--r-end", type=int, default=12)
    p.add_argument("--final-sparsity", type=float, default=0.5)
    p.add_argument("--prune-start", type=float, default=0.1, help="fraction of the run where pruning starts")
    p.add_argument("--prune-end", type=float, default=0.8, help="fraction of the run where final sparsity is reached")
    p.add_argument("--interval", type=int, default=None,
                   help="pruning / AdaLoRA allocation interval (default steps//12)")
    p.add_argument("--num-eval", type=int, default=64, help="held-out synthetic problems for eval loss and accuracy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                   help="eager is the faster one on this CPU for short chats (qft.demo)")
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
    tasks = _list(p, "--tasks", args.tasks, TASKS)
    methods = _list(p, "--methods", args.methods, METHODS)
    seeds = _list(p, "--seeds", args.seeds, None, int)
    if "shakespeare" in tasks and not SHAKESPEARE.is_file():
        p.error(f"--tasks shakespeare needs {SHAKESPEARE}; drop it from --tasks or put ../shared/data beside the repo")
    if args.steps < 10:
        p.error(f"--steps {args.steps}: need at least 10 for the pruning / AdaLoRA schedules")
    if not 0 <= args.prune_start < args.prune_end <= 1:
        p.error(f"--prune-start {args.prune_start} / --prune-end {args.prune_end}: need 0 <= start < end <= 1")
    interval = args.interval or max(1, args.steps // 12)
    spec = dict(model=args.model, quantization=args.quantization, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, text_seq_len=args.text_seq_len, text_eval_blocks=args.text_eval_blocks,
                lr=args.lr, warmup=args.warmup, lora_r=args.lora_r, r_start=args.r_start, r_end=args.r_end,
                final_sparsity=args.final_sparsity, interval=interval,
                prune_start_step=max(1, int(args.prune_start * args.steps)),
                prune_end_step=min(args.steps - 1, int(args.prune_end * args.steps)),
                num_eval=args.num_eval, threads=args.threads, attention=args.attention)
    runs_dir = out.parent / f"{out.name}.runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # seed-major order: a benchmark stopped early still holds whole seeds of every method
    runs = [_spawn(dict(spec, task=t, method=m, seed=s), runs_dir) for t in tasks for s in seeds for m in methods]
    summary = summarize(runs)
    results = {"summary": summary, "runs": runs,
               "settings": dict(spec, tasks=tasks, methods=methods, seeds=seeds,
                                command=shlex.join(["python", "benchmarks/prilora_vs_lora.py"] +
                                                   (argv if argv is not None else sys.argv[1:])),
                                machine=f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
                                total_wall_s=time.time() - t_start,
                                finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))}
    print(table(summary))
    from result_file import write_result

    write_result(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
