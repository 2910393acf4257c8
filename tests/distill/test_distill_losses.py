"""The divergences in qft.distill.losses: hand-computed values, reference formulas, masking, chunking."""
import math

import pytest
import torch
import torch.nn.functional as F

from qft.distill.losses import LOSSES, distill_loss, divergence_rows, shift_labels

# Two-token vocabulary: teacher p = (1/2, 1/2), student q = (1/4, 3/4), given as logits.
P = [0.5, 0.5]
Q = [0.25, 0.75]


def _logits(probs):
    return torch.tensor([math.log(x) for x in probs]).view(1, 1, -1)


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def _mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


HAND = {
    "forward_kl": _kl(P, Q),
    "reverse_kl": _kl(Q, P),
    "symmetric_kl": _kl(P, Q) + _kl(Q, P),
    "js": 0.5 * _kl(P, _mix(P, Q, 0.5)) + 0.5 * _kl(Q, _mix(P, Q, 0.5)),
    "skew_kl": _kl(P, _mix(P, Q, 0.1)),
    "skew_reverse_kl": _kl(Q, _mix(Q, P, 0.1)),
    "tv": 0.5 * (abs(0.5 - 0.25) + abs(0.5 - 0.75)),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_computed_values(name):
    got = distill_loss(_logits(Q), _logits(P), loss=name, skew_alpha=0.1)
    assert got.item() == pytest.approx(HAND[name], rel=1e-5)
    assert HAND["tv"] == 0.25 and HAND["forward_kl"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_jsd_with_beta_is_the_weighted_mixture_formula():
    beta = 0.3
    m = _mix(P, Q, beta)
    want = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
    got = distill_loss(_logits(Q), _logits(P), loss="jsd", beta=beta)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert distill_loss(_logits(Q), _logits(P), loss="jsd", beta=0.5).item() == pytest.approx(HAND["js"], rel=1e-6)


def _rand(n=6, v=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, v, generator=g) * 2, torch.randn(2, n, v, generator=g) * 2


def test_reference_formulas_in_torch():
    s, t = _rand()
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    p, q = log_p.exp(), log_q.exp()
    n = s.shape[0] * s.shape[1]
    ref = {
        "forward_kl": F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n,
        "reverse_kl": F.kl_div(log_p, log_q, log_target=True, reduction="sum") / n,
        "tv": 0.5 * (p - q).abs().sum() / n,
    }
    m = 0.5 * (p + q)
    ref["js"] = 0.5 * (F.kl_div(m.log(), p, reduction="sum") + F.kl_div(m.log(), q, reduction="sum")) / n
    ref["symmetric_kl"] = ref["forward_kl"] + ref["reverse_kl"]
    a = 0.2
    ref["skew_kl"] = F.kl_div((a * p + (1 - a) * q).log(), p, reduction="sum") / n
    ref["skew_reverse_kl"] = F.kl_div((a * q + (1 - a) * p).log(), q, reduction="sum") / n
    for name, want in ref.items():
        got = distill_loss(s, t, loss=name, skew_alpha=a)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_jsd_end_points_are_the_scaled_limits():
    s, t = _rand(seed=1)
    fkl = distill_loss(s, t, loss="forward_kl")
    rkl = distill_loss(s, t, loss="reverse_kl")
    eps = 1e-4
    assert (distill_loss(s, t, loss="jsd", beta=eps) / eps).item() == pytest.approx(fkl.item(), rel=1e-2)
    assert (distill_loss(s, t, loss="jsd", beta=1 - eps) / eps).item() == pytest.approx(rkl.item(), rel=1e-2)
    assert distill_loss(s, t, loss="jsd", beta=0.0).item() == pytest.approx(fkl.item())
    assert distill_loss(s, t, loss="jsd", beta=1.0).item() == pytest.approx(rkl.item())


def test_temperature_softens_and_scales_by_t_squared():
    s, t = _rand(seed=2)
    T = 3.0
    want = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
    want = want / (s.shape[0] * s.shape[1]) * T**2
    torch.testing.assert_close(distill_loss(s, t, loss="forward_kl", temperature=T), want)


def test_ignore_index_masks_tokens():
    s, t = _rand(seed=3)
    labels = torch.randint(0, 17, s.shape[:-1])
    labels[0, :3] = -100
    labels[1, 4] = -100
    keep = labels != -100
    want = distill_loss(s[keep], t[keep], loss="reverse_kl")
    got = distill_loss(s, t, labels, loss="reverse_kl")
    torch.testing.assert_close(got, want)
    # changing logits at masked positions changes nothing
    s2 = s.clone()
    s2[~keep] = 100.0
    torch.testing.assert_close(distill_loss(s2, t, labels, loss="reverse_kl"), got)
    # all masked -> 0, not nan
    assert distill_loss(s, t, torch.full_like(labels, -100)).item() == 0.0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk", [1, 4, 5, None])
def test_chunked_equals_unchunked_loss_and_grad(name, chunk):
    s, t = _rand(n=7, seed=4)
    labels = torch.randint(0, 17, s.shape[:-1])
    labels[0, 2:5] = -100
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    full = distill_loss(s1, t, labels, loss=name, chunk_size=None, temperature=2.0)
    part = distill_loss(s2, t, labels, loss=name, chunk_size=chunk, temperature=2.0)
    full.backward()
    part.backward()
    torch.testing.assert_close(part, full)
    torch.testing.assert_close(s2.grad, s1.grad)
    assert s1.grad.abs().sum() > 0


def test_low_precision_logits_are_computed_in_fp32():
    s, t = _rand(seed=5)
    want = distill_loss(s.bfloat16().float(), t.bfloat16().float(), loss="forward_kl")
    got = distill_loss(s.bfloat16(), t.bfloat16(), loss="forward_kl", chunk_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_per_token_reduction_and_identical_distributions():
    s, t = _rand(seed=6)
    rows = distill_loss(s, t, loss="forward_kl", reduction="none")
    assert rows.shape == s.shape[:-1]
    torch.testing.assert_close(rows.mean(), distill_loss(s, t, loss="forward_kl"))
    for name in LOSSES:
        assert distill_loss(s, s, loss=name).abs().item() < 1e-6, name


def test_shift_labels_aligns_with_next_token_logits():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="kl"), "loss='kl'.*allowed"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(loss="jsd", beta=1.5), "beta=1.5"),
    (dict(skew_alpha=1.0), "skew_alpha=1.0"),
    (dict(chunk_size=0), "chunk_size=0"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    s, t = _rand()
    with pytest.raises(ValueError, match=match):
        distill_loss(s, t, **kwargs)


def test_shape_mismatch_hints_at_vocab_slice():
    with pytest.raises(ValueError, match="vocab_slice"):
        distill_loss(torch.zeros(2, 5), torch.zeros(2, 6))


def test_divergence_rows_rejects_unknown_name():
    with pytest.raises(ValueError, match="allowed"):
        divergence_rows("nope", torch.zeros(1, 2), torch.zeros(1, 2))


@pytest.mark.parametrize("ratio, T, chunk", [(0.0, 1.0, 3), (0.3, 1.0, None), (0.7, 2.0, 4), (1.0, 1.0, 1)])
def test_kd_ce_loss_is_the_mixture_of_reference_ce_and_kd(ratio, T, chunk):
    from qft.distill import kd_ce_loss

    s, t = _rand(n=7, seed=7)
    labels = torch.randint(0, 17, s.shape[:-1])
    labels[1, :4] = -100
    s1 = s.clone().requires_grad_()
    ce_ref = F.cross_entropy(s1.reshape(-1, 17), labels.reshape(-1), ignore_index=-100)
    kd_ref = distill_loss(s1, t, labels, loss="jsd", beta=0.3, temperature=T, chunk_size=None)
    ref = (1 - ratio) * ce_ref + ratio * kd_ref
    ref.backward()
    s2 = s.clone().requires_grad_()
    loss, ce, kd = kd_ce_loss(s2, t, labels, ratio, loss="jsd", beta=0.3, temperature=T, chunk_size=chunk)
    (loss * 3).backward()  # a non-unit upstream gradient is applied
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ce, ce_ref.detach())
    torch.testing.assert_close(kd, kd_ref.detach())
    torch.testing.assert_close(s2.grad, 3 * s1.grad)
    assert not ce.requires_grad and not kd.requires_grad


def test_vocab_slice_compares_the_common_prefix_and_ce_uses_the_full_vocab():
    from qft.distill import kd_ce_loss

    s, t = _rand(v=20, seed=8)
    t = t[..., :17].contiguous()
    with pytest.raises(ValueError, match="vocab_slice"):
        distill_loss(s, t)
    torch.testing.assert_close(distill_loss(s, t, vocab_slice=True, chunk_size=5),
                               distill_loss(s[..., :17].contiguous(), t))
    labels = torch.randint(0, 20, s.shape[:-1])
    _, ce, _ = kd_ce_loss(s, t, labels, 0.5, vocab_slice=True)
    torch.testing.assert_close(ce, F.cross_entropy(s.reshape(-1, 20), labels.reshape(-1)))


def test_gradient_is_computed_only_when_needed():
    s, t = _rand(seed=9)
    with torch.no_grad():
        v = distill_loss(s.clone().requires_grad_(), t)
    assert not v.requires_grad
    s1 = s.clone().requires_grad_()
    distill_loss(s1, t, chunk_size=2).backward()
    assert s1.grad is not None and s1.grad.shape == s.shape
