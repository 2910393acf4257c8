"""PRILoRA math on small matrices computed by hand."""
import re

import pytest
import torch

from qft.prilora import math as pm


def test_rank_schedule_linear_and_rounded_half_up():
    assert pm.rank_schedule(4, 4, 12) == [4, 7, 9, 12]  # 4, 6.67, 9.33, 12
    assert pm.rank_schedule(3, 4, 12) == [4, 8, 12]
    assert pm.rank_schedule(5, 1, 2) == [1, 1, 2, 2, 2]  # 1, 1.25, 1.5 (half up), 1.75, 2
    assert pm.rank_schedule(1, 4, 12) == [8]
    assert pm.rank_schedule(3, 5, 5) == [5, 5, 5]


def test_rank_schedule_4_to_12_has_uniform_8_budget():
    for layers in (4, 30):
        ranks = pm.rank_schedule(layers, 4, 12)
        assert sum(ranks) == 8 * layers
        assert ranks == sorted(ranks)


@pytest.mark.parametrize("args", [(4, 12, 4), (4, 0, 3), (0, 1, 3), (0, 4, 12)])
def test_rank_schedule_rejects_bad_input(args):
    layers, r_start, r_end = args
    with pytest.raises(ValueError):
        pm.rank_schedule(layers, r_start, r_end)


def test_alpha_policies():
    assert pm.alpha_schedule([4, 12], "scale", 16.0, 8) == [8.0, 24.0]  # alpha/r = 2 everywhere
    assert pm.alpha_schedule([4, 12], "constant", 16.0, 8) == [16.0, 16.0]
    with pytest.raises(ValueError, match="alpha_policy"):
        pm.alpha_schedule([4], "sqrt", 16.0, 8)


def test_pattern_keys_follow_peft_matching():
    ranks, alphas = pm.build_patterns(12, 4, 12, layers_prefix="model.layers")
    key1 = [k for k in ranks if pm.layer_key("model.layers", 1) == k][0]
    peft_match = lambda key, name: re.match(rf"(.*\.)?({key})$", name) is not None  # noqa: E731
    assert peft_match(key1, "model.layers.1.self_attn.q_proj")
    assert peft_match(key1, "base_model.model.model.layers.1.mlp.down_proj")
    assert not peft_match(key1, "model.layers.11.self_attn.q_proj")
    assert not peft_match(key1, "model.layersX1.self_attn.q_proj")
    assert list(ranks.values()) == pm.rank_schedule(12, 4, 12)
    assert list(alphas.values()) == [2.0 * r for r in ranks.values()]


def test_layer_index_and_decoder_layer_discovery():
    assert pm.layer_index("base_model.model.model.layers.7.self_attn.q_proj", "model.layers") == 7
    assert pm.layer_index("lm_head", "model.layers") is None
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    net.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(5)])  # longer, but not named layers
    assert pm.find_decoder_layers(net) == ("model.layers", 3)
    with pytest.raises(ValueError, match="decoder layer"):
        pm.find_decoder_layers(torch.nn.Linear(2, 2))


def test_sparsity_schedules_by_hand():
    kw = dict(final_sparsity=0.5, start_step=10, end_step=20)
    assert pm.sparsity_at(5, **kw) == 0.0
    assert pm.sparsity_at(10, **kw) == 0.0
    assert pm.sparsity_at(15, **kw) == pytest.approx(0.5 * (1 - 0.5 ** 3))  # 0.4375
    assert pm.sparsity_at(15, schedule="linear", **kw) == pytest.approx(0.25)
    assert pm.sparsity_at(20, **kw) == 0.5
    assert pm.sparsity_at(99, **kw) == 0.5
    with pytest.raises(ValueError, match="sparsity_schedule"):
        pm.sparsity_at(15, schedule="exp", **kw)


def test_pruning_steps_every_interval_and_at_end():
    steps = [s for s in range(40) if pm.is_pruning_step(s, 10, 25, 10)]
    assert steps == [10, 20, 25]


def test_importance_by_hand():
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    ema = torch.tensor([4.0, 1.0])
    assert torch.equal(pm.importance(a, ema), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))
    with pytest.raises(ValueError):
        pm.importance(a, torch.ones(3))


def test_prune_count():
    assert pm.prune_count(10, 0.55) == 5
    assert pm.prune_count(4, 0.5) == 2
    assert pm.prune_count(3, 0.99) == 2  # never a whole row
    assert pm.prune_count(128, 0.0) == 0


def test_update_mask_per_row_without_and_with_regrow():
    score = torch.tensor([[0.1, 0.5, 0.2, 0.9],
                          [0.8, 0.7, 0.6, 0.5]])
    full = torch.ones(2, 4, dtype=torch.bool)
    fresh = pm.update_mask(score, full, 0.5)
    assert fresh.tolist() == [[False, True, False, True], [True, True, False, False]]
    # column 3 of row 0 was pruned earlier (although it now scores highest): it stays pruned,
    # and the row's second pruned entry is the least important kept one (column 0).
    old = torch.tensor([[True, True, True, False], [True, True, True, True]])
    kept = pm.update_mask(score, old, 0.5, regrow=False)
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]
    # regrow recomputes from scratch: column 3 comes back, column 2 goes.
    regrown = pm.update_mask(score, old, 0.5, regrow=True)
    assert regrown.tolist() == fresh.tolist()
    # a row already past its quota is not un-pruned without regrow
    heavy = torch.tensor([[False, False, False, True], [True, True, True, True]])
    assert pm.update_mask(score, heavy, 0.25).tolist()[0] == [False, False, False, True]


def test_update_mask_ties_break_by_column():
    score = torch.ones(1, 4)
    assert pm.update_mask(score, torch.ones(1, 4, dtype=torch.bool), 0.5).tolist() == [[False, False, True, True]]


def test_ema_update_by_hand():
    first = pm.ema_update(torch.zeros(2), torch.tensor([3.0, 4.0]), 0.9, first=True)
    assert first.tolist() == [3.0, 4.0]
    assert pm.ema_update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), 0.5, first=False).tolist() == [2.0, 3.0]
