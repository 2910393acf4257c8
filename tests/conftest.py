"""Shared fixtures: the reference data directory and small models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QFT_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repo (WikiText-2 test, Tiny Shakespeare); skip when absent."""
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.skip(f"reference data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from qft.models import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own temporary directory, so whatever a Trainer or library writes to the
    working directory (lightning_logs, adapters, gptqmodel logs) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so its result does not depend on which tests ran
    before it (LoRA's initialisation and the synthetic data draw from the global generator)."""
    import random

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def calib_tokens() -> torch.Tensor:
    """Random token ids [16, 64]: enough to make every tiny-llama Hessian full rank (export and ptq tests)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 5000, (16, 64), generator=g)


@pytest.fixture()
def tiny():
    from qft.models import load_model

    return load_model("tiny-llama", dtype=torch.float32).eval()
