"""Peak memory of a QLoRA fine-tune and of the GPTQ export (issue 12), each in a fresh process.

    python benchmarks/memory_scale.py --out /tmp/memory.json [--steps 2] [--batch-size 2] [--skip-export]

QLoRA rows (SmolLM2-135M + LoRA r=8 on the built-in addition task, ``--steps`` training steps): the peak
RSS (VmHWM) of the whole process and of the set-up alone (model built, before the first step), for
- ``nf4``: ``CausalLMModule(quantization="nf4")``, which builds the NF4 base tensor by tensor from
  safetensors with bf16 embeddings (``qft.qlora.load_nf4``);
- ``nf4_fp32_path``: the previous path, replayed here: load the fp32 model, then quantize it;
- ``bf16``: plain LoRA on a base loaded directly in bf16.
Export rows: ``qft export`` (GPTQ int4 g64, 128 x 512 calibration tokens of WikiText-2 test) of the plain
SmolLM2, run as the CLI: in memory, ``--layerwise``, and ``--layerwise --calibration-offload disk``; and
GPTQModel on the same model, grid and calibration shape (``gptq_vs_gptqmodel.py``'s worker, in the
repository's ``.venv-interop``; null when that venv is missing).

Depth rows (``--depths``, default 30,120,240,480): a random Llama with SmolLM2's widths and that many
decoder layers, written to bf16 safetensors shard by shard under ``--work``; for each, the peak RSS and
time of ``qft export --layerwise``'s engine (``export_layerwise``, int4 g64, 16 x 256 calibration tokens
from WikiText-2's second half) and of the NF4 set-up (``load_nf4``). ``capped``: the deepest model is
exported again inside a cgroup-v1 memory limit (``--cap-mb``, swap included) smaller than its bf16
weights; ``ok`` says whether it finished. A PNG of peak RSS against parameters is written beside the JSON.

JSON: ``qlora_nf4_peak_rss_mb``, ``lora_bf16_peak_rss_mb``, ``qlora_nf4_fp32_path_peak_rss_mb``, the
``*_setup_peak_rss_mb`` of each, ``baseline_rss_mb`` (the interpreter with the libraries imported),
``export_peak_rss_mb`` and ``export_s`` (the in-memory export), ``layerwise_export_peak_rss_mb`` (the same
export, layer-wise; ``layerwise_disk_*`` with the calibration activations on disk),
``gptqmodel_export_peak_rss_mb`` (null without the interop venv), ``depth`` (a list of
``{"layers", "params", "bf16_bytes", "export_peak_rss_mb", "export_s", "nf4_setup_peak_rss_mb"}``) and
``capped`` (``{"cap_mb", "model_bytes", "ok", "how"}``).
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

    def replay(load):
        """A module whose base comes from ``load(hp, compute_dtype)``: the paths qft no longer takes."""

        class Replayed(CausalLMModule):
            def configure_model(self):
                if self.model_ready:
                    return
                from peft import LoraConfig, get_peft_model

                hp = self.hparams
                self.model, self.tokenizer = load(hp, self.compute_dtype), models.load_tokenizer(hp.model)
                self.model = get_peft_model(self.model, LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
                self.model_ready = True

        return Replayed

    def fp32_then_nf4(hp, dtype):  # the NF4 set-up before load_nf4: the whole fp32 model first
        model = models.load_model(hp.model, dtype=torch.float32)
        quantize_nf4(model, compute_dtype=dtype)
        return model

    FP32PathModule = replay(fp32_then_nf4)
    BF16Module = replay(lambda hp, dtype: models.load_model(hp.model, dtype=torch.bfloat16))  # plain bf16 LoRA

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


def export_peak(tmp: Path, *extra: str) -> dict:
    """``qft export`` of plain SmolLM2 under /usr/bin/time: its max RSS and wall time."""
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model

    adapter = tmp / "adapter"  # an untrained (zero-B) adapter: the export then quantizes the plain base
    get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, target_modules="all-linear")).save_pretrained(adapter)
    cmd = [sys.executable, "-m", "qft.cli", "export", "--adapter", str(adapter), "--model", "smollm2-135m",
           "--output", str(tmp / "int4"), "--calibration", str(WIKITEXT), "--bits", "4", "--group-size", "64",
           "--n-samples", "128", "--seq-len", "512", "--no-drift", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"qft export failed:\n{r.stderr[-3000:]}")
    rss = next(int(line.split(":")[1]) for line in r.stderr.splitlines() if "Maximum resident set size" in line)
    return {"export_peak_rss_mb": rss / 1024.0, "export_s": time.perf_counter() - t0}


def gptqmodel_peak(tmp: Path) -> tuple[float | None, str]:
    """GPTQModel's peak RSS quantizing SmolLM2 (int4 g64, 128 x 512 tokens of WikiText-2's second half) with
    ``gptq_vs_gptqmodel.py``'s worker in the interop venv; ``(None, why)`` without it."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import gptq_vs_gptqmodel as g

    why = g.interop_ok(g.INTEROP)
    if why:
        return None, why
    _, calib = g.tokens("smollm2-135m", 128, 512, 16, 1024)
    torch.save(calib, tmp / "calib.pt")
    info, _ = g.finish_worker(g.start_worker(g.INTEROP, "gptqmodel", 64, tmp / "calib.pt", tmp, "smollm2-135m", "{}",
                                             {"GPTQMODEL_CPU_WORKERS": "2"}))
    if info is None:
        return None, "the GPTQModel worker failed: " + (tmp / "gptqmodel-g64.log").read_text()[-500:]
    return info["peak_rss_mb"], f"GPTQModel worker, {info['s']:.0f} s quantize, {info['whole_s']:.0f} s whole"


SMOLLM2_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=100000.0)


def write_deep_llama(path: Path, n_layers: int, seed: int = 0, per_shard: int = 16) -> dict:
    """A random Llama of SmolLM2's widths and ``n_layers`` layers, written in bf16 a few layers per shard (the
    whole model is never in memory). Returns ``{"params", "bf16_bytes"}``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=n_layers, **SMOLLM2_WIDTHS)
    config.save_pretrained(path)
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (h_dim := 64)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    assert config.hidden_size // config.num_attention_heads == h_dim
    params, weight_map, files = 0, {}, []
    shard = {"model.embed_tokens.weight": rnd(config.vocab_size, h), "model.norm.weight": torch.ones(h).bfloat16()}
    for i in range(n_layers):
        for name, shape in shapes.items():
            shard[f"model.layers.{i}.{name}.weight"] = rnd(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shard[f"model.layers.{i}.{norm}.weight"] = torch.ones(h).bfloat16()
        if (i + 1) % per_shard == 0 or i + 1 == n_layers:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            files.append(name)
            params += sum(t.numel() for t in shard.values())
            weight_map.update({k: name for k in shard})
            shard = {}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"params": params, "bf16_bytes": 2 * params}


def layerwise_worker(model_dir: str, out_dir: str, n: int, seq: int) -> dict:
    """One layer-wise export (int4 g64) of ``model_dir``; prints its summary."""
    import torch

    from qft import models
    from qft.export.calibration import calibration_tokens, skip_start
    from qft.export.config import GPTQConfig
    from qft.export.layerwise import export_layerwise

    tok = models.load_tokenizer("smollm2-135m")
    tokens = calibration_tokens(skip_start(str(WIKITEXT), 0.5), tok, n, seq)
    t0 = time.perf_counter()
    export_layerwise(model_dir, out_dir, GPTQConfig(bits=4, group_size=64), tokens, progress=False)
    return {"export_s": time.perf_counter() - t0, "peak_rss_mb": vm_hwm_mb(), "threads": torch.get_num_threads()}


def nf4_setup_worker(model_dir: str) -> dict:
    import torch

    from qft.qlora import load_nf4

    load_nf4(model_dir, compute_dtype=torch.bfloat16)
    return {"peak_rss_mb": vm_hwm_mb()}


CGROUP = Path("/sys/fs/cgroup/memory")


def capped_run(args: list[str], cap_mb: int) -> tuple[bool, str]:
    """Run this script with ``args`` inside a fresh cgroup-v1 memory limit (RAM and swap); ``(ok, how)``."""
    group = CGROUP / f"qft-cap-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(cap_mb << 20))
    except OSError as e:
        return False, f"no writable cgroup-v1 memory controller ({e})"
    try:
        script = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        r = subprocess.run(["sh", "-c", script, "sh", sys.executable, __file__, *args], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        failcnt = (group / "memory.failcnt").read_text().strip()
        ok = r.returncode == 0
        how = (f"cgroup v1 memory.limit_in_bytes = memory.memsw.limit_in_bytes = {cap_mb} MiB; exit "
               f"{r.returncode}; limit hit {failcnt} times (page cache reclaimed)")
        if not ok:
            how += f"; stderr tail: {r.stderr[-500:]}"
        return ok, how
    finally:
        group.rmdir()


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["depth"]
    x = [r["params"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, [r["bf16_bytes"] / 2**20 for r in rows], "k:", label="bf16 weights (model size)")
    ax.plot(x, [r["export_peak_rss_mb"] for r in rows], "o-", label="qft export --layerwise, peak RSS")
    ax.plot(x, [r["nf4_setup_peak_rss_mb"] for r in rows], "s-", label="NF4 QLoRA set-up, peak RSS")
    if out.get("export_peak_rss_mb"):
        ax.plot([x[0]], [out["export_peak_rss_mb"]], "x", ms=9, label="in-memory export (SmolLM2 protocol)")
    if out.get("gptqmodel_export_peak_rss_mb"):
        ax.plot([x[0]], [out["gptqmodel_export_peak_rss_mb"]], "^", ms=9, label="GPTQModel (SmolLM2)")
    if out.get("capped"):
        ax.axhline(out["capped"]["cap_mb"], color="r", lw=0.8,
                   label=f"cap for the capped run ({'ok' if out['capped']['ok'] else 'failed'})")
    ax.set_xlabel("parameters (M): SmolLM2 widths, 1x-16x its depth")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--skip-export", action="store_true", help="skip the in-memory SmolLM2 export row")
    p.add_argument("--depths", default="30,120,240,480", help="decoder layers of the random deep Llamas ('' to skip)")
    p.add_argument("--work", default="/tmp/qft-memory-scale", help="where the deep models are written")
    p.add_argument("--cap-mb", type=int, default=1536, help="memory cap of the capped run (MiB)")
    p.add_argument("--calib", default="16x256", help="calibration of the depth rows: N x SEQ")
    p.add_argument("--gptqmodel-json", help="take GPTQModel's peak from this gptq_vs_gptqmodel.py --groups 64 JSON "
                   "instead of running it again (9 minutes on 2 cores)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", nargs="*", default=[], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "layerwise":
        print(json.dumps(layerwise_worker(a.worker_args[0], a.worker_args[1], int(a.worker_args[2]),
                                          int(a.worker_args[3]))))
        return
    if a.worker == "nf4-setup":
        print(json.dumps(nf4_setup_worker(a.worker_args[0])))
        return
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
           "export_peak_rss_mb": None, "export_s": None, "layerwise_export_peak_rss_mb": None,
           "gptqmodel_export_peak_rss_mb": None, "depth": [], "capped": None}
    if not a.skip_export and WIKITEXT.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            out.update(export_peak(Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            lw = export_peak(Path(tmp), "--layerwise")
            out["layerwise_export_peak_rss_mb"], out["layerwise_export_s"] = lw["export_peak_rss_mb"], lw["export_s"]
        with tempfile.TemporaryDirectory() as tmp:
            lw = export_peak(Path(tmp), "--layerwise", "--calibration-offload", "disk")
            out["layerwise_disk_export_peak_rss_mb"] = lw["export_peak_rss_mb"]
            out["layerwise_disk_export_s"] = lw["export_s"]
        if a.gptqmodel_json:  # GPTQModel's peak from gptq_vs_gptqmodel.py's run (same model, grid, calibration)
            run = json.loads(Path(a.gptqmodel_json).read_text())["runs"]["g64"]
            out["gptqmodel_export_peak_rss_mb"] = run["gptqmodel_peak_rss_mb"]
            out["gptqmodel_note"] = f"from {a.gptqmodel_json} (gptq_vs_gptqmodel.py, g64)"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out["gptqmodel_export_peak_rss_mb"], out["gptqmodel_note"] = gptqmodel_peak(Path(tmp))
    depths = [int(d) for d in a.depths.split(",") if d]
    if depths and WIKITEXT.is_file():
        import shutil

        n, seq = a.calib.split("x")
        work = Path(a.work)
        for layers in depths:
            model_dir = work / f"llama-{layers}"
            shutil.rmtree(model_dir, ignore_errors=True)
            size = write_deep_llama(model_dir, layers)
            q_dir = work / f"int4-{layers}"
            shutil.rmtree(q_dir, ignore_errors=True)
            exp = _child(["--worker", "layerwise", "--worker-args", str(model_dir), str(q_dir), n, seq])
            shutil.rmtree(q_dir, ignore_errors=True)
            setup = _child(["--worker", "nf4-setup", "--worker-args", str(model_dir)])
            out["depth"].append({"layers": layers, **size, "export_peak_rss_mb": exp["peak_rss_mb"],
                                 "export_s": exp["export_s"], "nf4_setup_peak_rss_mb": setup["peak_rss_mb"]})
            print(json.dumps(out["depth"][-1]), flush=True)
            if layers == max(depths):
                ok, how = capped_run(["--worker", "layerwise", "--worker-args", str(model_dir), str(q_dir), n, seq],
                                     a.cap_mb)
                out["capped"] = {"cap_mb": a.cap_mb, "model_bytes": size["bf16_bytes"], "layers": layers, "ok": ok,
                                 "how": how}
                shutil.rmtree(q_dir, ignore_errors=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    if out["depth"]:
        plot(out, Path(a.out).with_suffix(".png"))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
