"""``qft.layers``: every linear kind answers the same protocol, and the consumers see only that."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qft import layers
from qft.quant import GPTQLinear, QuantScheme


@pytest.fixture(scope="module")
def models():
    """tiny-llama as: plain, NF4, LoRA over fp, LoRA over NF4 (adapters with non-zero B)."""
    from qft.module import CausalLMModule

    out = {}
    for name, kw in {"plain": {}, "lora": dict(adapter="lora"),
                     "qlora": dict(quantization="nf4", adapter="lora")}.items():
        m = CausalLMModule(model="tiny-llama", compute_dtype="float32", lora_r=4, **kw)
        m.configure_model()
        g = torch.Generator().manual_seed(0)
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = m.model.eval()
    return out


def test_kinds_and_outermost_layers(models):
    for name, kind in (("plain", "linear"), ("lora", "lora"), ("qlora", "lora")):
        found = layers.linear_layers(layers.unwrap(models[name]))
        assert len(found) == 4 * 7 + 1  # 7 per block, plus lm_head
        assert not any(p in n for n in found for p in ("lora_A", "lora_B", "base_layer"))
        assert layers.kind_of(found["model.layers.0.self_attn.q_proj"]).name == kind
    q = layers.linear_layers(layers.unwrap(models["qlora"]))["model.layers.0.self_attn.q_proj"]
    assert layers.kind_of(q.base_layer).name == "nf4" and not layers.base_trainable(q)


def test_weight_is_base_plus_delta(models):
    m = layers.linear_layers(layers.unwrap(models["qlora"]))["model.layers.1.mlp.up_proj"]
    x = torch.randn(3, m.in_features)
    with torch.no_grad():
        assert torch.allclose(m(x), x @ layers.weight(m).t(), atol=1e-4)  # what the layer computes
    delta = layers.adapter_delta(m)
    assert delta.abs().max() > 0
    assert torch.allclose(layers.weight(m), layers.base_weight(m) + delta)
    with layers.adapters_disabled(models["qlora"]):
        assert layers.adapter_delta(m) is None
        with torch.no_grad():
            assert torch.allclose(m(x), x @ layers.base_weight(m).t(), atol=1e-4)
    assert layers.adapter_delta(m) is not None  # restored


def test_fake_quant_and_converted_layers_carry_their_grid(models):
    from qft.qat import QATConfig, convert, prepare

    model = models["qlora"]
    cfg = QATConfig(weight=QuantScheme(bits=4, group_size=64))
    import copy

    m = copy.deepcopy(model)
    prepare(m, cfg)
    found = layers.linear_layers(layers.unwrap(m))
    fq = found["model.layers.0.mlp.down_proj"]
    assert layers.kind_of(fq).name == "fake_quant" and layers.adapters(fq)
    grids = layers.grids(m)
    assert len(grids) == 4 * 7 and layers.learned_scheme(m) == cfg.weight
    qw = grids["model.layers.0.mlp.down_proj"]
    # the grid's dequantized weight is what the fake-quant forward multiplies by
    x = torch.randn(2, fq.in_features)
    with torch.no_grad():
        assert torch.allclose(fq(x), x @ qw.dequantize().t(), atol=1e-5)
    with layers.fake_quant_disabled(m):
        assert not bool(fq.qat_enabled)
    assert bool(fq.qat_enabled)
    convert(m)
    conv = layers.linear_layers(layers.unwrap(m))["model.layers.0.mlp.down_proj"]
    assert isinstance(conv, GPTQLinear) and layers.kind_of(conv).name == "converted"
    back = layers.grid(conv)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    assert layers.scheme(conv).bits == 4 and layers.scheme(conv).group_size == 64


def test_plain_qat_under_an_adapter_is_a_grid_outside_the_merge(models):
    import copy

    from qft.qat import QATConfig, prepare

    m = copy.deepcopy(models["lora"])
    prepare(m, QATConfig(weight=QuantScheme(bits=4, group_size=64), lora_merged=False))
    under = layers.grid_under_adapter(m)
    assert len(under) == 4 * 7 and under[0].startswith("model.layers.0")


def test_a_new_kind_plugs_in_everywhere():
    """A layer kind registered once is found by every consumer (here: linear_layers and weight)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.in_features = self.out_features = 4

    class ScaledKind(layers.Kind):
        name = "scaled"

        def matches(self, m):
            return isinstance(m, Scaled)

        def base_weight(self, m):
            return 2 * m.inner.weight.detach().float()

    net = nn.Sequential(Scaled(), nn.Linear(4, 4))
    layers.register_kind(ScaledKind())
    try:
        found = layers.linear_layers(net)
        assert list(found) == ["0", "1"]  # the inner linear is part of the kind, not a layer of its own
        assert torch.equal(layers.weight(found["0"]), 2 * net[0].inner.weight.detach())
    finally:
        layers.KINDS[:] = [k for k in layers.KINDS if k.name != "scaled"]


def test_unknown_module_is_a_clear_error():
    with pytest.raises(TypeError, match="not a linear layer kind"):
        layers.weight(nn.ReLU())
