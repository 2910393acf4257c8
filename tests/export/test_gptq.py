"""The GPTQ solve on small hand-built problems: exactness against RTN, error reduction, options."""
import pytest
import torch

from qft.export import GPTQConfig, gptq_solve, rtn_solve
from qft.export.gptq import damped_inverse_cholesky, group_params, relative_output_error


def problem(out=64, inn=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g)
    mix = torch.randn(inn, inn, generator=g) * 0.15 + torch.eye(inn)
    X = torch.randn(n, inn, generator=g) @ mix * (torch.rand(inn, generator=g) * 3 + 0.1)  # correlated, uneven
    return W, 2 * X.T @ X / n


def test_identity_hessian_reduces_to_rtn():
    W, _ = problem()
    cfg = GPTQConfig(bits=4, group_size=64)
    q, r = gptq_solve(W, torch.eye(W.shape[1]), cfg), rtn_solve(W, cfg)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)


@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=3, sym=False), dict(bits=2, group_size=32, desc_act=True),
                                dict(bits=8), dict(group_size=-1), dict(desc_act=True),
                                dict(desc_act=True, static_groups=False),
                                dict(mse=True), dict(true_sequential=False, group_size=128),
                                dict(act_group_aware=True), dict(act_group_aware=True, bits=3, sym=False)])
def test_gptq_beats_rtn_on_output_error(kw):
    W, H = problem()
    cfg = GPTQConfig(**kw)
    q = gptq_solve(W, H, cfg)
    rtn_err = relative_output_error(W, rtn_solve(W, cfg).dequantize(), H)
    assert q.rel_error < 0.8 * rtn_err
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**cfg.bits - 1
    if cfg.sym:
        assert torch.all(q.zero == 2 ** (cfg.bits - 1))
    gs = cfg.group_for(W.shape[1])
    assert q.scale.shape == (W.shape[0], W.shape[1] // gs)


def test_lazy_batch_updates_match_column_by_column():
    W, H = problem(out=32, inn=128)
    a = gptq_solve(W, H, GPTQConfig(block_size=128, group_size=32))
    b = gptq_solve(W, H, GPTQConfig(block_size=1, group_size=32))
    assert (a.codes == b.codes).float().mean() > 0.995
    assert abs(a.rel_error - b.rel_error) < 1e-3 * max(a.rel_error, 1e-9) + 1e-6


def test_act_order_static_groups_keep_natural_g_idx():
    W, H = problem()
    q = gptq_solve(W, H, GPTQConfig(desc_act=True, static_groups=True, group_size=64))
    assert torch.equal(q.g_idx, torch.arange(256, dtype=torch.int32) // 64)
    d = gptq_solve(W, H, GPTQConfig(desc_act=True, static_groups=False, group_size=64))
    assert not torch.equal(d.g_idx, q.g_idx)  # dynamic groups follow the activation order
    assert torch.equal(torch.bincount(d.g_idx.long()), torch.full((4,), 64))
    # the dequantized weight follows g_idx, whatever the order
    assert relative_output_error(W, d.dequantize(), H) == pytest.approx(d.rel_error)


def test_short_last_group():
    W, H = problem(inn=96)
    q = gptq_solve(W, H, GPTQConfig(group_size=64))
    assert q.scale.shape[1] == 2 and int(q.g_idx.max()) == 1 and int((q.g_idx == 1).sum()) == 32


def test_dead_inputs_are_zeroed():
    W, H = problem()
    H[:, 5] = 0
    H[5, :] = 0
    q = gptq_solve(W, H, GPTQConfig())
    assert torch.all(q.dequantize()[:, 5] == 0)


def test_damping_is_raised_until_cholesky_succeeds():
    x = torch.randn(4, 64)
    H = x.T @ x  # rank 4 of 64: singular without damping
    U, damp = damped_inverse_cholesky(H, 0.0, 0.01)
    assert damp > 0 and torch.isfinite(U).all()
    W = torch.randn(32, 64)
    q = gptq_solve(W, H, GPTQConfig(damp_percent=0.0, damp_auto_increment=0.01))
    assert q.damp_percent > 0


def test_mse_clip_search_never_worse_than_minmax():
    w = torch.randn(64, 128)
    w[:, 0] = 12.0  # an outlier makes min-max wasteful
    s0, z0 = group_params(w, 3, True)
    s1, z1 = group_params(w, 3, True, mse=True)

    def err(s, z):
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 7)
        return ((s[:, None] * (q - z[:, None]) - w).abs() ** 2.4).sum(1)

    assert torch.all(err(s1, z1) <= err(s0, z0) + 1e-4) and err(s1, z1).sum() < err(s0, z0).sum()


def test_scales_are_fp16_representable():
    W, H = problem()
    q = gptq_solve(W, H, GPTQConfig(sym=False, bits=4))
    assert torch.equal(q.scale, q.scale.half().float())


@pytest.mark.parametrize("kw,msg", [(dict(bits=5), "bits=5"), (dict(bits=1), "bits=1"),
                                    (dict(group_size=0), "group_size"),
                                    (dict(damp_percent=1.5), "damp_percent"), (dict(method="smoothquant"), "method"),
                                    (dict(desc_act=True, act_group_aware=True), "pick one column order"),
                                    (dict(hessian_dtype="fp16"), "hessian_dtype='fp16'")])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPTQConfig(**kw)


def test_group_aware_order_keeps_groups_contiguous_and_natural_g_idx():
    from qft.export.gptq import column_order

    diag = torch.tensor([1.0, 9.0, 2.0, 3.0, 0.5, 4.0])  # groups of 2: maxima 9, 3, 4
    groups = torch.arange(6) // 2
    perm = column_order(diag, groups, GPTQConfig(act_group_aware=True, group_size=2))
    assert perm.tolist() == [1, 0, 5, 4, 3, 2]  # group 0 (max 9), group 2 (max 4), group 1 (max 3)
    assert column_order(diag, groups, GPTQConfig(group_size=2, act_group_aware=False)) is None
    assert GPTQConfig().act_group_aware and not GPTQConfig(desc_act=True).act_group_aware  # default: unless desc_act
    assert column_order(diag, groups, GPTQConfig(desc_act=True, group_size=2)).tolist() == [1, 5, 3, 2, 0, 4]
    W, H = problem()
    q = gptq_solve(W, H, GPTQConfig(act_group_aware=True, group_size=64))
    assert torch.equal(q.g_idx, torch.arange(256, dtype=torch.int32) // 64)


def test_group_aware_with_a_short_last_group():
    W, H = problem(inn=96)
    q = gptq_solve(W, H, GPTQConfig(group_size=64, act_group_aware=True))
    assert torch.equal(q.g_idx, torch.arange(96, dtype=torch.int32) // 64)
    assert q.rel_error < relative_output_error(W, rtn_solve(W, GPTQConfig(group_size=64)).dequantize(), H)


def test_gptq_solve_leaves_its_inputs_alone_and_can_skip_the_error_report():
    W, H = problem()
    W0, H0 = W.clone(), H.clone()
    q = gptq_solve(W, H, GPTQConfig(act_group_aware=True), report_error=False)
    assert torch.equal(W, W0) and torch.equal(H, H0) and q.rel_error == 0.0


def test_config_from_the_qat_scheme_shares_its_grid():
    from qft.quant import QuantScheme
    from qft.quant.grid import rtn_quantize_weight

    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    cfg = GPTQConfig.from_scheme(scheme, method="rtn", damp_percent=0.05)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.damp_percent) == (3, 32, False, 0.05)
    W, _ = problem()
    codes, scale, zero = rtn_quantize_weight(W, scheme)
    r = rtn_solve(W, cfg)
    assert torch.equal(r.codes, codes) and torch.equal(r.scale, scale) and torch.equal(r.zero, zero)
    assert GPTQConfig.from_scheme(QuantScheme(granularity="per_channel")).group_size == -1
    with pytest.raises(ValueError, match="come from the scheme"):
        GPTQConfig.from_scheme(scheme, bits=4)
    with pytest.raises(ValueError, match="per_token"):
        GPTQConfig.from_scheme(QuantScheme(granularity="per_token", dynamic=True))


@pytest.mark.parametrize("kw", [dict(), dict(act_group_aware=False), dict(desc_act=True)])
def test_given_grid_is_kept_and_only_the_codes_are_solved(kw):
    """GPTQ refinement of a learned grid: scales and zeros stay exactly as given, the codes beat rounding."""
    W, H = problem()
    cfg = GPTQConfig(bits=4, group_size=64, **kw)
    grid = rtn_solve(W * 1.1, cfg)  # a grid fitted elsewhere (as QAT learns one), not W's min-max
    q = gptq_solve(W, H, cfg, grid=(grid.scale, grid.zero))
    assert torch.equal(q.scale, grid.scale) and torch.equal(q.zero, grid.zero)
    assert torch.equal(q.g_idx, torch.arange(W.shape[1], dtype=torch.int32) // 64)  # natural groups
    from qft.quant.grid import expand_groups, quantize

    nearest = quantize(W, expand_groups(grid.scale, 256), expand_groups(grid.zero, 256), 15)
    deq_nearest = expand_groups(grid.scale, 256) * (nearest - expand_groups(grid.zero, 256))
    assert q.rel_error < 0.8 * relative_output_error(W, deq_nearest, H)
    with pytest.raises(ValueError, match="do not fit"):
        gptq_solve(W, H, GPTQConfig(bits=4, group_size=32), grid=(grid.scale, grid.zero))
