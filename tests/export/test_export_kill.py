"""SIGKILL during ``qft export`` loses nothing: no partial output, and the next run cleans up and succeeds.

Each export runs in a real subprocess (``kill_export_script.py``) that SIGKILLs itself at the worst
moments: with the whole result written into the hidden work directory but not yet renamed, and in the
middle of an ``--overwrite`` swap, after the previous result was moved aside.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("kill_export_script.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, calib_text):
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model

    root = tmp_path_factory.mktemp("kill")
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.save_pretrained(root / "adapter")
    (root / "calib.txt").write_text("\n".join(calib_text))
    return root


def _export(inputs, when, out, *extra):
    args = ["--adapter", str(inputs / "adapter"), "--model", "tiny-llama", "--output", str(out), "--calibration",
            str(inputs / "calib.txt"), "--n-samples", "8", "--seq-len", "64", "--group-size", "64", "--dtype",
            "float32", "--no-drift", *extra]
    return subprocess.run([sys.executable, str(SCRIPT), when, "--", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)


def _hidden(out: Path):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _weights(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


def test_sigkill_while_writing_then_rerun(inputs, tmp_path):
    ref = _export(inputs, "none", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "q"
    killed = _export(inputs, "writing", out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()  # no partial output under the real name
    (left,) = _hidden(out)
    assert left.startswith(".q.tmp-") and (out.parent / left / "model.safetensors").is_file()

    rerun = _export(inputs, "none", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"removed {left}, left by an interrupted export" in rerun.stderr
    assert _hidden(out) == [] and _weights(out) == _weights(tmp_path / "ref")  # the same result


def test_sigkill_mid_overwrite_puts_the_previous_result_back(inputs, tmp_path):
    out = tmp_path / "q"
    first = _export(inputs, "none", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _weights(out)
    (out / "marker").write_text("the previous result")

    killed = _export(inputs, "swapping", out, "--overwrite", "--group-size", "32")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()  # killed between the two renames: the previous result sits in .q.old-*

    rerun = _export(inputs, "none", out)  # no --overwrite: put back, then refused as existing
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    assert "restored" in rerun.stderr and "already exists" in rerun.stderr and "Traceback" not in rerun.stderr
    assert _hidden(out) == [] and _weights(out) == before and (out / "marker").read_text() == "the previous result"
