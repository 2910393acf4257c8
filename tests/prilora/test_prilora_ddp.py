"""Under DDP the EMAs are all-reduced before each pruning step, so every rank computes the same mask."""
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def test_two_rank_gloo_masks_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PL_DISABLE_FORK="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["last_pruned_step"] == r1["last_pruned_step"] == 4
    assert r0["masks"].keys() == r1["masks"].keys() and len(r0["masks"]) == 28
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["emas"][name], r1["emas"][name]), name
        assert (~r0["masks"][name]).float().mean() == 0.5
    for k in r0["lora_A"]:
        assert torch.equal(r0["lora_A"][k], r1["lora_A"][k]), k
    # The ranks saw different data: from their local EMAs alone they would have chosen different masks.
    differ = [n for n in r0["local_masks"] if not torch.equal(r0["local_masks"][n], r1["local_masks"][n])]
    assert differ, "the ranks' local masks agree, so this test could not detect a missing all-reduce"
