"""Real 2-process FSDP2 fits on CPU (gloo), next to DDP: the shards train to the very weights DDP trains.

``examples/multi_gpu.py --strategy fsdp`` runs Lightning's ModelParallelStrategy; the module shards
itself with ``fully_shard`` (``qft.sharding``). Each rank must hold half of the trainable weights, and
the gathered weights must match a DDP run of the same data and seed. NF4 and whole-weight callbacks are
refused at set-up with a message.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _fit(out, strategy, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "examples/multi_gpu.py", "--model", "tiny-llama", "--accelerator", "cpu",
                           "--devices", "2", "--strategy", strategy, "--quantization", "none", "--max-steps", "3",
                           "--batch-size", "2", "--num-train", "24", "--root", str(out / "run"), "--report",
                           str(out / "rep"), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("adapter,qat", [("none", False), ("lora", False), ("lora", True)],
                         ids=["full", "lora", "lora-qat"])
def test_fsdp_shards_and_matches_ddp(tmp_path, adapter, qat):
    extra = ["--adapter", adapter] + (["--qat"] if qat else [])
    runs = {}
    for strategy in ("fsdp", "ddp"):
        r = _fit(tmp_path / strategy, strategy, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        reps = [json.loads((tmp_path / strategy / "rep" / f"rank{i}.json").read_text()) for i in (0, 1)]
        assert [x["world_size"] for x in reps] == [2, 2]
        assert reps[0]["checksum"] == reps[1]["checksum"]  # the gathered weights agree on both ranks
        runs[strategy] = reps, load_file(tmp_path / strategy / "rep" / "trainable.safetensors")
    (f0, f1), fsdp = runs["fsdp"]
    (d0, _), ddp = runs["ddp"]
    assert f0["local_numel"] + f1["local_numel"] == f0["numel"] and f0["local_numel"] < f0["numel"]  # sharded
    assert d0["local_numel"] == d0["numel"]  # replicated
    assert fsdp.keys() == ddp.keys()
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-7, msg=k)
    if adapter == "lora":
        assert any(v.abs().sum() > 0 for k, v in fsdp.items() if "lora_B" in k)  # moved from the zero init
        saved = load_file(next((tmp_path / "fsdp" / "run").rglob("adapter_model.safetensors")))
        assert saved and all(v.shape[0] == 8 or v.shape[1] == 8 for v in saved.values())  # whole, not shards


def test_fsdp_refuses_nf4_at_set_up(tmp_path):
    r = _fit(tmp_path, "fsdp", "--quantization", "nf4")
    assert r.returncode != 0, r.stderr[-4000:]
    assert "quantization='nf4') cannot be sharded by ModelParallelStrategy" in r.stderr and "strategy='ddp'" in r.stderr


def _whole_weight_callbacks():
    from qft.export import GPTQExportCallback
    from qft.prilora import PRILoRACallback
    from qft.qat import QATCallback

    return {"prilora": PRILoRACallback(), "export": GPTQExportCallback("unused"),
            "qat-learned": QATCallback(range_learning=True), "qat-convert": QATCallback(convert_on_fit_end=True)}


@pytest.mark.parametrize("name", ["prilora", "export", "qat-learned", "qat-convert"])
def test_fsdp_refuses_whole_weight_callbacks(name, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    from qft.module import CausalLMModule

    cb = _whole_weight_callbacks()[name]
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(1, 1), callbacks=[cb],
                         logger=False, default_root_dir=tmp_path)
    module = CausalLMModule(model="tiny-llama", adapter="lora")
    module.trainer = trainer
    with pytest.raises(ValueError, match=f"{type(cb).__name__} cannot run under ModelParallelStrategy.*strategy='ddp'"):
        module.setup("fit")
    assert not module.model_ready  # refused before the model was built
    ok = pl.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, default_root_dir=tmp_path)
    module.trainer = ok
    module.setup("fit")  # the same callback under the default strategy is fine
