"""Fixtures for the W8A8 tests: tiny-llama (fp32) and random calibration tokens (no data files)."""
import pytest
import torch


@pytest.fixture(scope="session")
def calib_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 5000, (16, 64), generator=g)


@pytest.fixture()
def tiny():
    from qft.models import load_model

    return load_model("tiny-llama", dtype=torch.float32).eval()
