import pytest
import torch

from qft.quant import GPTQLinear, QuantScheme, rtn_fake_quant_weight, rtn_quantize_weight
from qft.quant.grid import scale_zero_from_range
from qft.quant.pack import pack_gptq, pack_rows, unpack_gptq, unpack_rows


@pytest.mark.parametrize("kw, match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(granularity="per_row"), "granularity"),
    (dict(group_size=0), "group_size"), (dict(granularity="per_token"), "dynamic"),
])
def test_scheme_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kw)


def test_check_layer_names_the_module():
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj"):
        QuantScheme(group_size=128).check_layer("model.layers.0.mlp.down_proj", 576)
    QuantScheme(group_size=64).check_layer("x", 576)


def test_symmetric_grid_by_hand():
    # 4-bit symmetric: scale = 2*absmax/15, zero = 8
    scale, zero = scale_zero_from_range(torch.tensor([-3.0]), torch.tensor([1.5]), 4, True)
    assert scale.item() == pytest.approx(6.0 / 15) and zero.item() == 8
    # asymmetric: range [-1, 2] on 2 bits: scale 1, zero 1
    scale, zero = scale_zero_from_range(torch.tensor([-1.0]), torch.tensor([2.0]), 2, False)
    assert scale.item() == pytest.approx(1.0) and zero.item() == 1


def test_asymmetric_nonnegative_group_keeps_v1_writable_zero():
    scale, zero = scale_zero_from_range(torch.tensor([0.5]), torch.tensor([3.0]), 2, False)
    assert zero.item() == 1 and scale.item() == pytest.approx(3.0 / 2)  # xmax stays on the grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (96, 64))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 64)
    assert torch.equal(unpack_rows(packed, bits), codes.int())


def test_pack_4bit_nibble_order_by_hand():
    codes = torch.arange(32).remainder(16).view(32, 1)  # 0,1,...,15,0,...,15
    packed = pack_rows(codes, 4)
    assert packed[0, 0].item() == 0x76543210 and packed[1, 0].item() == -0x01234568  # 0xFEDCBA98 as int32


@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, True), (8, True)])
def test_gptq_linear_matches_rtn_fake_quant(bits, sym):
    torch.manual_seed(0)
    scheme = QuantScheme(bits=bits, group_size=32, symmetric=sym)
    w = torch.randn(64, 96)
    codes, scale, zero = rtn_quantize_weight(w, scheme)
    layer = GPTQLinear.from_codes(codes, scale, zero, torch.arange(96) // 32, bits, 32)
    assert torch.equal(layer.dequantized_weight(), rtn_fake_quant_weight(w, scheme))
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ rtn_fake_quant_weight(w, scheme).t())
    err = (rtn_fake_quant_weight(w, scheme) - w).abs().mean()
    assert err < 0.6 / 2 ** (bits - 2)  # more bits, less error


def test_v1_zero_points_are_stored_minus_one():
    codes = torch.zeros(32, 32, dtype=torch.int32)
    t = pack_gptq(codes, torch.ones(32, 1), torch.full((32, 1), 8.0), torch.zeros(32, dtype=torch.int32), 4)
    assert unpack_rows(t["qzeros"].t().contiguous(), 4).unique().tolist() == [7]
    w = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    assert torch.equal(w, torch.full((32, 32), -8.0))
