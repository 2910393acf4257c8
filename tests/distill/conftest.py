from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shared_data():
    d = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    if not d.is_dir():
        pytest.skip(f"reference data directory {d} is absent")
    return d.resolve()


@pytest.fixture
def token_batches():
    return make_token_batches


def make_token_batches(n, batch=4, seq=24, seed=0, high=300):
    """Deterministic token batches drawn from a small alphabet, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, high, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # a "prompt" that must not count
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    return out
