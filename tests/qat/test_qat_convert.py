"""prepare -> (train) -> convert on tiny-llama: the packed model computes what the fake-quant model did."""
import pytest
import torch
from torch import nn

from qft.qat import (
    ActQuantGPTQLinear,
    FakeQuantLinear,
    FakeQuantLoRALinear,
    QATConfig,
    convert,
    fake_quant_modules,
    prepare,
)
from qft.quant import GPTQLinear, QuantScheme

IDS = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_steps(model, n=3, lr=1e-3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("weight", [
    QuantScheme(bits=4, group_size=64, symmetric=True),
    QuantScheme(bits=3, group_size=32, symmetric=False),
    QuantScheme(bits=2, granularity="per_channel", symmetric=False),
    QuantScheme(bits=8, group_size=128, symmetric=True),
], ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_converted_forward_matches_fake_quant(tiny_llama, weight):
    full = logits(tiny_llama)
    names = prepare(tiny_llama, QATConfig(weight=weight))
    assert len(names) == 28 and "lm_head" not in " ".join(names)
    fq = logits(tiny_llama)
    assert (fq - full).abs().max() > 1e-4  # fake-quant really changes the model
    convert(tiny_llama)
    assert not fake_quant_modules(tiny_llama)
    q = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(q, GPTQLinear) and q.bits == weight.bits
    assert (logits(tiny_llama) - fq).abs().max().item() <= 1e-5


def test_training_then_convert_with_activation_quant_and_range_learning(tiny_llama):
    cfg = QATConfig(weight=QuantScheme(bits=4, group_size=32, symmetric=False), range_learning=True,
                    activation=QuantScheme(bits=8, granularity="per_tensor"))
    prepare(tiny_llama, cfg)
    layer = tiny_llama.model.layers[1].self_attn.o_proj
    assert isinstance(layer, FakeQuantLinear) and isinstance(layer.weight_scale, nn.Parameter)
    before = None
    train_steps(tiny_llama, n=1)
    before = layer.weight_scale.detach().clone()
    train_steps(tiny_llama, n=2)
    assert not torch.equal(before, layer.weight_scale.detach())  # scales learned
    assert layer.input_quant.num_updates.item() == 3
    fq = logits(tiny_llama)
    convert(tiny_llama)
    conv = tiny_llama.model.layers[1].self_attn.o_proj
    assert isinstance(conv, ActQuantGPTQLinear)
    assert (logits(tiny_llama) - fq).abs().max().item() <= 1e-5


def test_swap_keeps_parameters_and_kwargs(tiny_llama):
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight
    prepare(tiny_llama, QATConfig(weight=QuantScheme(bits=4, group_size=64)))
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert layer.weight is w  # same Parameter object: optimizers and ties stay valid
    x = torch.randn(3, 128)
    assert torch.equal(layer(x, "ignored-positional", extra=1), layer(x))
    assert prepare(tiny_llama, QATConfig(weight=QuantScheme(bits=4, group_size=64))) == []  # idempotent


def test_lora_merged_fake_quantizes_merged_weight_and_converts_exactly(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)  # non-zero B so the merge matters
    cfg = QATConfig(weight=QuantScheme(bits=4, group_size=32), lora_merged=True)
    prepare(model, cfg)
    layers = dict(fake_quant_modules(model))
    merged = [n for n, m in layers.items() if isinstance(m, FakeQuantLoRALinear)]
    assert len(merged) == 8 and all(n.endswith(("q_proj", "v_proj")) for n in merged)
    assert not any("lora_" in n for n in layers)  # adapters themselves are never quantized
    lay = layers[merged[0]]
    w = lay.merged_weight()
    assert torch.allclose(lay.fake_quant_weight(w), lay.fake_quant_weight(w))
    # the layer's output is x @ fq(W + s*B@A).T
    x = torch.randn(2, 128)
    from qft.quant.grid import rtn_fake_quant_weight
    ref = x @ rtn_fake_quant_weight(w.detach(), cfg.weight).T
    assert torch.allclose(lay(x), ref, atol=1e-5)
    b_before = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().clone()
    train_steps(model, n=2)
    assert not torch.equal(b_before, lay.lora_B["default"].weight)  # adapter trains through the merged grid
    fq = logits(model)
    convert(model)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, GPTQLinear)
    assert (logits(model) - fq).abs().max().item() <= 1e-5


def test_prepare_after_convert_is_a_clear_error(tiny_llama):
    prepare(tiny_llama, QATConfig(weight=QuantScheme(bits=4, group_size=64)))
    convert(tiny_llama)
    with pytest.raises(RuntimeError, match="already converted"):
        prepare(tiny_llama, QATConfig(weight=QuantScheme(bits=4, group_size=64)))


def test_partial_last_group_is_opt_in_and_exact():
    """in_features=96 with group 64: an error by default; with allow_partial_groups the short group gets
    the scale of its own 32 columns (what a GPTQ exporter computes) and converts exactly."""
    from qft.quant.grid import fp16_scale, scale_zero_from_range

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64))
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    with pytest.raises(ValueError, match="allow_partial_groups"):
        prepare(model, QATConfig(weight=scheme))
    prepare(model, QATConfig(weight=scheme, allow_partial_groups=True))
    layer = model[0]
    x = torch.randn(5, 96)
    layer.train()
    y = layer(x)
    w = layer.weight.detach()
    s_tail, _ = scale_zero_from_range(w[:, 64:].amin(1), w[:, 64:].amax(1), 4, False)
    assert layer.weight_scale.shape == (64, 2)
    assert torch.equal(layer.weight_scale[:, 1], fp16_scale(s_tail))
    convert(model)
    assert isinstance(model[0], GPTQLinear)
    assert torch.allclose(model[0](x), y.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_init_starts_learned_scales_nearer_the_weight_and_converts_exactly(tiny_llama, symmetric):
    """init='mse' moves only where learned scales start: the fake-quant weight is closer to the latent
    one than min-max's at the first forward, and convert still writes what the forward computed."""
    import copy

    weight = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    errors = {}
    for init in ("minmax", "mse"):
        model = copy.deepcopy(tiny_llama)
        prepare(model, QATConfig(weight=weight, range_learning=True, init=init))
        fq = logits(model)  # the first forward sets the learned scales
        layer = model.model.layers[0].mlp.down_proj
        w = layer.weight.detach().float()
        errors[init] = float((layer.fake_quant_weight(w).detach() - w).pow(2).sum())
        convert(model)
        assert (logits(model) - fq).abs().max().item() <= 1e-5
    assert errors["mse"] < errors["minmax"]
