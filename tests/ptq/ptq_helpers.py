"""Helpers shared by the W8A8 tests."""
import torch


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()
