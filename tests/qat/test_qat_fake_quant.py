"""Fake-quant math: forward on the export grid, STE and LSQ gradients, activation quantizers."""
import pytest
import torch

from qft.qat.fake_quant import grouped, lsq_fake_quant, per_token_params, ste_fake_quant
from qft.qat.observer import ActivationFakeQuant
from qft.quant import QuantScheme
from qft.quant.grid import fp16_scale, rtn_fake_quant_weight, weight_params


@pytest.mark.parametrize("bits,sym,gran", [(4, True, "per_group"), (3, False, "per_group"), (2, False, "per_channel"),
                                           (8, True, "per_channel")])
def test_ste_forward_is_the_export_grid(bits, sym, gran):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    s = QuantScheme(bits=bits, group_size=32, symmetric=sym, granularity=gran)
    scale, zero = weight_params(w, s)
    g = s.group_for(128)
    out = ste_fake_quant(grouped(w, g), scale.unsqueeze(-1), zero.unsqueeze(-1), s.maxq).reshape(w.shape)
    assert torch.equal(out, rtn_fake_quant_weight(w, s))
    assert len(torch.unique(out[0, :g])) <= 2**bits


def test_ste_gradient_passes_inside_and_stops_where_clamped():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 5.0], requires_grad=True)
    scale, zero, maxq = torch.tensor(0.5), torch.tensor(2.0), 7  # grid covers [-1.0, 2.5]
    y = ste_fake_quant(x, scale, zero, maxq)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(y.detach(), torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.5]))


def test_lsq_gradients_match_autograd_reference():
    """Our closed-form LSQ backward equals autograd through an explicit STE formulation."""
    torch.manual_seed(0)
    w = torch.randn(8, 2, 16)
    scale0 = fp16_scale(torch.rand(8, 2, 1) * 0.2 + 0.05)
    zero0 = torch.full((8, 2, 1), 7.0)
    maxq = 15
    gout = torch.randn(8, 2, 16)

    x1, s1, z1 = w.clone().requires_grad_(), scale0.clone().requires_grad_(), zero0.clone().requires_grad_()
    lsq_fake_quant(x1, s1, z1, maxq, group_numel=16).backward(gout)

    x2, s2, z2 = w.clone().requires_grad_(), scale0.clone().requires_grad_(), zero0.clone().requires_grad_()
    xs = x2 / s2
    r = xs + (torch.round(xs) - xs).detach()
    q = torch.clamp(r + z2, 0, maxq)
    ref = s2 * (q - z2)
    # LSQ scales only the range gradients
    factor = 1.0 / (16 * maxq) ** 0.5
    s_hook = s2.register_hook(lambda g: g * factor)
    z_hook = z2.register_hook(lambda g: g * factor)
    ref.backward(gout)
    s_hook.remove(), z_hook.remove()
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-5)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-5)
    assert s1.grad.abs().sum() > 0


def test_per_token_dynamic_quant_uses_each_tokens_range():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    x[0, 0] *= 100  # one loud token must not coarsen the others
    aq = ActivationFakeQuant(QuantScheme(bits=8, granularity="per_token", dynamic=True))
    y = aq(x)
    scale, _ = per_token_params(x, 8, True)
    assert scale.shape == (2, 3, 1)
    err = (y - x).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert err[0, 1].max() < err[0, 0].max() / 10


def test_moving_average_observer_updates_only_in_training_while_observing():
    aq = ActivationFakeQuant(QuantScheme(bits=8, granularity="per_tensor"), momentum=0.5)
    aq.train()
    aq(torch.tensor([-1.0, 2.0]))
    assert aq.min_val.item() == -1.0 and aq.max_val.item() == 2.0
    aq(torch.tensor([-3.0, 4.0]))
    assert aq.min_val.item() == -2.0 and aq.max_val.item() == 3.0  # 0.5-average
    aq.observing.fill_(False)
    aq(torch.tensor([-30.0, 40.0]))
    aq.eval()
    aq(torch.tensor([-30.0, 40.0]))
    assert aq.min_val.item() == -2.0 and aq.max_val.item() == 3.0 and aq.num_updates.item() == 2
    y = aq(torch.tensor([10.0]))  # clamped to the observed range
    assert y.item() == pytest.approx(3.0, abs=0.05)
