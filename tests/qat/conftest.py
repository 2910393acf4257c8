"""Fixtures for the QAT tests."""
import pytest
import torch


@pytest.fixture
def tiny_llama():
    from qft.models import load_model

    return load_model("tiny-llama", dtype=torch.float32, seed=0)
