"""Peak memory of a QLoRA fine-tune and of the GPTQ export (issue 12), each in a fresh process.

    python benchmarks/memory_scale.py --out /tmp/memory.json [--steps 2] [--batch-size 2] [--skip-export]

QLoRA rows (SmolLM2-135M + LoRA r=8 on the built-in addition task, ``--steps`` training steps): the peak
RSS (VmHWM) of the whole process and of the set-up alone (model built, before the first step), for
- ``nf4``: ``CausalLMModule(quantization="nf4")``, which builds the NF4 base tensor by tensor from
  safetensors with bf16 embeddings (``qft.qlora.load_nf4``);
- ``nf4_fp32_path``: the previous path, replayed here: load the fp32 model, then quantize it;
- ``bf16``: plain LoRA on a base loaded directly in bf16.
Export row: ``qft export`` (GPTQ int4 g64, the calibration protocol of ``gptq_vs_gptqmodel.py``: 128
windows of 512 tokens from the second half of WikiText-2 test) of the plain SmolLM2, run as the CLI.

JSON: ``qlora_nf4_peak_rss_mb``, ``lora_bf16_peak_rss_mb``, ``qlora_nf4_fp32_path_peak_rss_mb``, the
``*_setup_peak_rss_mb`` of each, ``baseline_rss_mb`` (the interpreter with the libraries imported),
``export_peak_rss_mb``, ``export_s``, and ``gptqmodel_export_peak_rss_mb``, ``depth`` and ``capped``,
which stay null/empty until the layer-wise export lands (BENCHMARKS.md says so).
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

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.raw"


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def qlora_worker(kind: str, steps: int, batch_size: int) -> dict:
    import pytorch_lightning as pl
    import torch

    from qft import models
    from qft.data import QFTDataModule
    from qft.module import CausalLMModule
    from qft.qlora import quantize_nf4

    baseline = vm_hwm_mb()

    class FP32PathModule(CausalLMModule):
        """The NF4 set-up before load_nf4: the whole fp32 model first, then quantisation."""

        def configure_model(self):
            if self.model_ready:
                return
            from peft import LoraConfig, get_peft_model

            hp = self.hparams
            self.model = models.load_model(hp.model, dtype=torch.float32)
            self.tokenizer = models.load_tokenizer(hp.model)
            quantize_nf4(self.model, compute_dtype=self.compute_dtype)
            self.model = get_peft_model(self.model, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
            self.model_ready = True

    class BF16Module(CausalLMModule):
        """Plain LoRA on a base loaded directly in bf16."""

        def configure_model(self):
            if self.model_ready:
                return
            from peft import LoraConfig, get_peft_model

            hp = self.hparams
            self.model = models.load_model(hp.model, dtype=torch.bfloat16)
            self.tokenizer = models.load_tokenizer(hp.model)
            self.model = get_peft_model(self.model, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
            self.model_ready = True

    cls = {"nf4": CausalLMModule, "nf4_fp32_path": FP32PathModule, "bf16": BF16Module}[kind]
    pl.seed_everything(0)
    module = cls(model="smollm2-135m", quantization="none" if kind == "bf16" else "nf4", adapter="lora",
                 lora_r=8, save_adapter=False, attention="eager")
    module.configure_model()
    setup_peak = vm_hwm_mb()
    data = QFTDataModule(task="synthetic", batch_size=batch_size, num_train=64, num_val=8, seq_len=64)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"kind": kind, "baseline_rss_mb": baseline, "setup_peak_rss_mb": setup_peak, "peak_rss_mb": vm_hwm_mb(),
            "fit_s": time.perf_counter() - t0, "loss": float(trainer.callback_metrics["train/loss"])}


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def export_peak(tmp: Path) -> dict:
    """``qft export`` of plain SmolLM2 under /usr/bin/time: its max RSS and wall time."""
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model

    adapter = tmp / "adapter"  # an untrained (zero-B) adapter: the export then quantizes the plain base
    get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, target_modules="all-linear")).save_pretrained(adapter)
    cmd = [sys.executable, "-m", "qft.cli", "export", "--adapter", str(adapter), "--model", "smollm2-135m",
           "--output", str(tmp / "int4"), "--calibration", str(WIKITEXT), "--bits", "4", "--group-size", "64",
           "--n-samples", "128", "--seq-len", "512", "--no-drift"]
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"qft export failed:\n{r.stderr[-3000:]}")
    rss = next(int(l.split(":")[1]) for l in r.stderr.splitlines() if "Maximum resident set size" in l)
    return {"export_peak_rss_mb": rss / 1024.0, "export_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(qlora_worker(a.worker, a.steps, a.batch_size)))
        return
    if not a.out:
        p.error("--out is required")
    rows = {k: _child(["--worker", k, "--steps", str(a.steps), "--batch-size", str(a.batch_size)])
            for k in ("nf4", "nf4_fp32_path", "bf16")}
    out = {"steps": a.steps, "batch_size": a.batch_size, "baseline_rss_mb": rows["nf4"]["baseline_rss_mb"],
           "qlora_nf4_peak_rss_mb": rows["nf4"]["peak_rss_mb"],
           "qlora_nf4_setup_peak_rss_mb": rows["nf4"]["setup_peak_rss_mb"],
           "qlora_nf4_fp32_path_peak_rss_mb": rows["nf4_fp32_path"]["peak_rss_mb"],
           "qlora_nf4_fp32_path_setup_peak_rss_mb": rows["nf4_fp32_path"]["setup_peak_rss_mb"],
           "lora_bf16_peak_rss_mb": rows["bf16"]["peak_rss_mb"],
           "lora_bf16_setup_peak_rss_mb": rows["bf16"]["setup_peak_rss_mb"], "rows": rows,
           "export_peak_rss_mb": None, "export_s": None, "gptqmodel_export_peak_rss_mb": None, "depth": [],
           "capped": None}
    if not a.skip_export and WIKITEXT.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            out.update(export_peak(Path(tmp)))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
