"""W8A8Linear computes what a compressed-tensors int-quantized checkpoint declares."""
import pytest
import torch

from qft import layers
from qft.ptq.layer import W8A8Linear, input_scale_from_absmax


def _layer(input_scale=None, bias=True):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (64, 96), generator=g, dtype=torch.int32).to(torch.int8)
    s = torch.rand(64, 1, generator=g) * 1e-2 + 1e-3
    b = torch.randn(64, generator=g) if bias else None
    return W8A8Linear(w, s, input_scale, b)


def test_dynamic_forward_is_per_token_int8_times_int8():
    lin = _layer()
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1)) * 3
    absmax = x.abs().amax(-1, keepdim=True)
    sx = absmax / 127  # vLLM's dynamic per-token int8 kernel: absmax / 127, so +-absmax -> +-127
    qx = torch.clamp(torch.round(x / sx), -128, 127)
    ref = (qx * sx) @ (lin.weight.float() * lin.weight_scale).t() + lin.bias
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    assert qx.abs().max() == 127  # each token's largest value is exactly on the grid's end, never on a tie


def test_static_forward_uses_the_calibrated_scale_and_clips():
    scale = input_scale_from_absmax(torch.tensor(2.0))
    torch.testing.assert_close(scale, torch.tensor([2.0 / 127]))
    lin = _layer(scale, bias=False)
    x = torch.tensor([[5.0] * 96])  # beyond the calibrated range: clipped to 127 steps
    ref = (127 * scale) * (lin.weight.float() * lin.weight_scale).sum(1)
    torch.testing.assert_close(lin(x)[0], ref, rtol=1e-5, atol=1e-5)


def test_int8_kernel_gives_the_same_outputs():
    if not hasattr(torch, "_int_mm"):
        pytest.skip("this torch has no torch._int_mm")
    lin = _layer()
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    ref = lin(x)
    lin.int8_kernel = True
    try:
        got = lin(x)
    except RuntimeError as e:  # a build without the CPU kernel
        pytest.skip(f"torch._int_mm unavailable on this device: {e}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_it_is_a_layer_kind_qft_knows():
    lin = _layer()
    kind = layers.kind_of(lin)
    assert kind.name == "w8a8" and not layers.base_trainable(lin)
    torch.testing.assert_close(layers.weight(lin), lin.weight.float() * lin.weight_scale)
    qw = layers.grid(lin)
    torch.testing.assert_close(qw.dequantize(), layers.weight(lin))
    assert layers.scheme(lin).bits == 8 and layers.scheme(lin).granularity == "per_channel"
