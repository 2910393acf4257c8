"""A fit SIGKILLed mid-epoch and resumed from ``last.ckpt`` ends bit-for-bit where an uninterrupted run ends.

Each run is a real subprocess (``resume_script.py``). The kill falls at step 8 of 12 in a 16-batch epoch,
two steps after the last checkpoint (step 6), while PRILoRA is pruning and QAT is learning its scales, so
the resumed run must restore the data order (StatefulDataLoader), the adapters, masks, EMAs, learned
scales, observer statistics, optimizer moments and LR schedule exactly. With a plain DataLoader the same
test ends at a different loss (10.118 against 10.222 for the first case when this was written).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("resume_script.py")


def _run(case, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT), case, str(out), *extra], capture_output=True, text=True,
                          env=env, timeout=600)


def _assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _training_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    callbacks = {k: v for k, v in ckpt["callbacks"].items() if not k.startswith("ModelCheckpoint")}  # holds paths
    return {"state_dict": ckpt["state_dict"], "callbacks": callbacks, "optimizer_states": ckpt["optimizer_states"],
            "lr_schedulers": ckpt["lr_schedulers"]}


@pytest.mark.parametrize("case", ["qlora-prilora-qat", "qat"])
def test_sigkill_mid_epoch_resumes_bit_for_bit(case, tmp_path):
    full = _run(case, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _run(case, tmp_path / "killed", "--kill-at", "8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "result.json").exists()
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    # mid-epoch, loader state in
    assert saved["global_step"] == 6 and saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]

    resumed = _run(case, tmp_path / "resumed", "--ckpt", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = json.loads((tmp_path / "full" / "result.json").read_text())
    got = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert got == want and want["global_step"] == 12
    _assert_same(_training_state(tmp_path / "full" / "final.ckpt"),
                 _training_state(tmp_path / "resumed" / "final.ckpt"), "checkpoint")
