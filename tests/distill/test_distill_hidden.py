"""Hidden-state distillation: layer maps, MSE/cosine values, masking, and the learned projection."""
import pytest
import torch
import torch.nn.functional as F

from qft.distill import HiddenStateLoss, uniform_layer_map


def test_uniform_layer_map_meets_at_the_last_layer():
    assert uniform_layer_map(2, 4) == [[1, 2], [2, 4]]
    assert uniform_layer_map(3, 3) == [[1, 1], [2, 2], [3, 3]]
    assert uniform_layer_map(4, 30)[-1] == [4, 30]


def _states(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 5, d, generator=g) for _ in range(n + 1))


def test_mse_and_cosine_match_reference_with_mask():
    s, t = _states(2, 8, 0), _states(4, 8, 1)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    keep = mask.bool()
    mse = HiddenStateLoss(2, 4, 8, 8, loss="mse", layer_map=[[1, 2], [2, 4]])
    want = ((s[1] - t[2])[keep].pow(2).mean() + (s[2] - t[4])[keep].pow(2).mean()) / 2
    torch.testing.assert_close(mse(s, t, mask), want)
    cos = HiddenStateLoss(2, 4, 8, 8, loss="cosine", layer_map=[[2, 4]])
    want = (1 - F.cosine_similarity(s[2], t[4], dim=-1))[keep].mean()
    torch.testing.assert_close(cos(s, t, mask), want)
    assert mse.proj is None and not list(mse.parameters())


def test_projection_learns_when_widths_differ():
    torch.manual_seed(0)
    s, t = _states(2, 8, 2), _states(2, 12, 3)
    loss = HiddenStateLoss(2, 2, 8, 12, loss="mse")
    assert len(loss.proj) == 2 and loss.proj[0].weight.shape == (12, 8)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = loss(s, t).item()
    for _ in range(30):
        opt.zero_grad()
        v = loss(s, t)
        v.backward()
        opt.step()
    assert v.item() < first * 0.9
    assert all(p.grad is not None for p in loss.parameters())


def test_bad_hidden_configs_raise():
    with pytest.raises(ValueError, match="projection=False"):
        HiddenStateLoss(2, 2, 8, 12, projection=False)
    with pytest.raises(ValueError, match=r"pair \[3, 1\] is out of range"):
        HiddenStateLoss(2, 2, 8, 8, layer_map=[[3, 1]])
    with pytest.raises(ValueError, match="loss='l1'"):
        HiddenStateLoss(2, 2, 8, 8, loss="l1")
