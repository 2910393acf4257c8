"""A pruned checkpoint keeps its zeros: through full fine-tuning (masked gradients), a LoRA merge (masked
delta) and a later int4 export (zeros held as a fixed mask)."""
from __future__ import annotations

import pytest
import torch

from qft import sparsity
from qft.export import GPTQConfig, quantize_model, save_quantized


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    from qft.models import load_model, load_tokenizer

    model = load_model("tiny-llama", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 5000, (8, 64), generator=g)
    cfg = GPTQConfig(method="none", sparsity=0.5, prune_method="magnitude")
    q, _ = quantize_model(model, cfg, calib, progress=False)
    out = tmp_path_factory.mktemp("pruned") / "ck"
    return save_quantized(model, q, cfg, out, tokenizer=load_tokenizer("tiny-llama"), dtype=torch.float32)


def test_a_loaded_pruned_checkpoint_is_sparse_and_full_fine_tuning_keeps_its_zeros(pruned_dir):
    from qft.models import load_model

    model = load_model(str(pruned_dir), dtype=torch.float32)
    assert sparsity.is_sparse(model) and sparsity.zero_fraction(model) >= 0.5
    assert sparsity.protect_zeros(model) == 28
    zeros = {n: w == 0 for n, w in sparsity.decoder_weights(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 5000, (2, 32), generator=torch.Generator().manual_seed(0))
    before = {n: w.detach().clone() for n, w in sparsity.decoder_weights(model).items()}
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, w in sparsity.decoder_weights(model).items():
        assert torch.all(w[zeros[n]] == 0), n
        assert not torch.equal(w, before[n]), n  # the other weights did train


def test_the_module_protects_zeros_and_a_lora_merge_keeps_them(pruned_dir):
    from qft.export.merge import merge_adapters
    from qft.module import CausalLMModule

    full = CausalLMModule(model=str(pruned_dir), compute_dtype="float32")
    full.configure_model()
    assert all(getattr(w, "_qft_zeros_protected", False) for w in sparsity.decoder_weights(full.model).values())

    lora = CausalLMModule(model=str(pruned_dir), compute_dtype="float32", adapter="lora", lora_r=4)
    lora.configure_model()
    for name, p in lora.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: its delta is dense
    merged = merge_adapters(lora.model)
    assert sparsity.zero_fraction(merged) >= 0.5


def test_a_later_int4_export_holds_the_zeros(pruned_dir, calib_tokens):
    from qft.models import load_model

    for method in ("gptq", "rtn"):
        model = load_model(str(pruned_dir), dtype=torch.float32)
        zeros = {n: w == 0 for n, w in sparsity.decoder_weights(model).items()}
        q, _ = quantize_model(model, GPTQConfig(bits=4, group_size=64, method=method), calib_tokens, progress=False,
                              keep_zeros=True)
        for n, z in zeros.items():
            assert torch.all(q[n].dequantize()[z] == 0), (method, n)
