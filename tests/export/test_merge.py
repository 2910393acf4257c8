"""Merging adapters: into the original fp weights or the dequantized NF4 ones, PRILoRA masks, drift."""
import pytest
import torch

from qft.export.merge import drift, lora_deltas, merge_adapters
from qft.layers import hf_name


@pytest.fixture(scope="module")
def qlora():
    from qft.module import CausalLMModule

    m = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", compute_dtype="float32", lora_r=4)
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    for n, p in m.model.named_parameters():
        if "lora_B" in n:  # B starts at zero; give the adapters something to merge
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.model.eval()


def test_merge_into_dequantized_nf4_reproduces_the_trained_model(qlora, calib_tokens):
    merged = merge_adapters(qlora, "tiny-llama", merge_into="dequantized_nf4")
    d = drift(qlora, merged, calib_tokens, max_samples=2, max_len=32)
    assert d["max_logit_diff"] < 1e-3 and abs(d["kl"]) < 1e-6


def test_merge_into_original_adds_the_deltas_to_the_fp_weights(qlora, calib_tokens):
    from qft.models import load_model

    base = load_model("tiny-llama", dtype=torch.float32)
    merged = merge_adapters(qlora, "tiny-llama", merge_into="original")
    name = "model.layers.1.mlp.up_proj"
    delta = lora_deltas(qlora)[name]
    assert delta.abs().max() > 0
    w_merged = merged.get_submodule(name).weight
    assert torch.allclose(w_merged, base.get_submodule(name).weight + delta, atol=1e-6)
    d = drift(qlora, merged, calib_tokens, max_samples=2, max_len=32)
    assert d["max_logit_diff"] > 1e-3  # the NF4 rounding is gone: a real, measured difference
    assert "lora" not in " ".join(n for n, _ in merged.named_modules())


def test_prilora_masks_are_applied(qlora):
    name = "model.layers.0.self_attn.q_proj"
    lora = qlora.get_submodule("base_model.model." + name)
    mask = torch.ones_like(lora.lora_A["default"].weight)
    mask[:, ::2] = 0
    masked = lora_deltas(qlora, masks={"base_model.model." + name: mask})[name]
    A = lora.lora_A["default"].weight.detach() * mask
    expected = lora.lora_B["default"].weight.detach() @ A * lora.scaling["default"]
    assert torch.allclose(masked, expected, atol=1e-6)
    assert not torch.allclose(masked, lora_deltas(qlora)[name])


def test_bad_merge_option(qlora):
    with pytest.raises(ValueError, match="merge_into='nf4'"):
        merge_adapters(qlora, "tiny-llama", merge_into="nf4")


def test_hf_name():
    assert hf_name("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
