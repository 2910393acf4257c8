"""Fixtures for the export tests: tiny-llama in bf16/fp32 and calibration tokens that need no data files."""
from __future__ import annotations

import pytest
import torch

TEXT = ("The quick brown fox jumps over the lazy dog while the cat watches from the window. "
        "Quantization maps each weight to a small integer grid; GPTQ corrects the rounding error column by column. ")


@pytest.fixture(scope="session")
def calib_text() -> list[str]:
    """Varied English sentences (the tokenizer needs real text; no file needed)."""
    words = TEXT.split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(40)]
