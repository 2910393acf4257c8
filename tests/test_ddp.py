"""A real 2-process DDP fit on CPU (gloo) with tiny-llama NF4 QLoRA: both ranks end identical, and the
GPTQ export at fit end runs once, on rank 0, while rank 1 waits for it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_fit_keeps_ranks_identical(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "examples/multi_gpu.py", "--model", "tiny-llama", "--accelerator", "cpu",
                        "--devices", "2", "--strategy", "ddp", "--max-steps", "3", "--batch-size", "2",
                        "--num-train", "24", "--root", str(tmp_path / "run"), "--report", str(tmp_path / "rep"),
                        "--export", str(tmp_path / "int4")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    reps = [json.loads((tmp_path / "rep" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["world_size"] for x in reps] == [2, 2]
    assert reps[0]["checksum"] == reps[1]["checksum"] and reps[0]["abs_sum"] == reps[1]["abs_sum"]
    assert reps[0]["abs_sum"] > 0  # LoRA B moved away from its zero init
    # GPTQExportCallback: rank 0 exported once, rank 1 waited at the barrier until the checkpoint existed
    assert reps[0]["export_seen"] and reps[1]["export_seen"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".int4", "int4"))) == ["int4"]
    qc = json.loads((tmp_path / "int4" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["quant_method"]) == (4, 64, "gptq")
    from qft.export import load_quantized

    with torch.no_grad():
        assert torch.isfinite(load_quantized(tmp_path / "int4")(torch.ones(1, 4, dtype=torch.long)).logits).all()
