"""Block-by-block GPTQ on tiny-llama: grouping, error reduction, early stop, checks before work."""
import copy
from unittest import mock

import pytest
import torch
from torch import nn

import qft.export.sequential as seq
from qft.export import GPTQConfig, quantize_model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def test_groups_follow_shared_inputs(tiny, calib_tokens):
    cache = seq.capture_block_inputs(tiny, calib_tokens[:2], 2, "cpu")
    groups = seq.discover_groups(tiny.model.layers[0], *cache[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("kw", [dict(), dict(true_sequential=False), dict(desc_act=True, group_size=64)])
def test_gptq_beats_rtn_end_to_end(tiny, calib_tokens, kw):
    ev = torch.randint(0, 5000, (2, 64), generator=torch.Generator().manual_seed(5))
    ref = logits(tiny, ev)
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(tiny)
        q, rows = quantize_model(m, GPTQConfig(method=method, **kw), calib_tokens, batch_size=8, progress=False)
        assert len(q) == 28 and len(rows) == 28
        errs[method] = ((logits(m, ev) - ref) ** 2).mean().item()
        # the model now holds exactly the dequantized weights that will be packed
        w = m.model.layers[1].mlp.down_proj.weight
        assert torch.equal(w, q["model.layers.1.mlp.down_proj"].dequantize().to(w.dtype))
    assert errs["gptq"] < 0.8 * errs["rtn"]


def test_bf16_linear_tail_shortcut_is_used_and_exact_enough(calib_tokens):
    from qft.models import load_model

    m = load_model("tiny-llama", dtype=torch.bfloat16)
    results = []
    real = seq._tail_matches

    def record(*a, **k):
        results.append(real(*a, **k))
        return results[-1]

    with mock.patch.object(seq, "_tail_matches", side_effect=record):
        quantize_model(copy.deepcopy(m), GPTQConfig(), calib_tokens, batch_size=8, progress=False)
    assert results == [True, True, True]  # every block but the last took the shortcut, and it checked out


def test_hessian_is_fp32_and_counts_tokens():
    acc = seq.HessianAccumulator(8)
    acc.add(torch.randn(3, 5, 8, dtype=torch.bfloat16))
    assert acc.H.dtype == torch.float32 and acc.n_tokens == 15


def test_no_decoder_blocks_fails_before_work():
    with pytest.raises(ValueError, match="no decoder blocks"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), GPTQConfig(), torch.zeros(1, 4, dtype=torch.long))


def test_unpackable_layer_fails_before_work():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(40, 64)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_model(M(), GPTQConfig(), torch.zeros(1, 4, dtype=torch.long))


def test_group_size_not_dividing_in_features_warns():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).eval()
    with pytest.warns(UserWarning, match="does not divide in_features"):
        q, _ = quantize_model(m, GPTQConfig(group_size=64), torch.randint(0, 256, (4, 32)), progress=False)
    assert q["model.layers.0.self_attn.q_proj"].scale.shape == (96, 2)  # 64 + a short group of 32
