"""Block-by-block GPTQ on tiny-llama: grouping, error reduction, early stop, checks before work."""
import copy
from unittest import mock

import pytest
import torch
from torch import nn

import qft.export.blocks as blocks
import qft.export.sequential as seq
from qft.export import GPTQConfig, quantize_model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("kw", [dict(), dict(true_sequential=False), dict(desc_act=True, group_size=64),
                                dict(act_group_aware=True, group_size=64)])
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
    # Held out, on a random 4-layer model with 1024 calibration tokens, GPTQ's gain over RTN varies with the
    # calibration seed (measured ratios 0.63-0.97 over seeds 1-3 and these orders); per-layer output error,
    # what GPTQ minimises, is held to < 0.8x RTN in test_gptq.py.
    assert errs["gptq"] < 0.9 * errs["rtn"]


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


def test_replaying_final_attention_outputs_changes_nothing(calib_tokens):
    from qft.models import load_model

    m = load_model("tiny-llama", dtype=torch.bfloat16)
    runs, replays = {}, {}
    # "ending": self_attn replayed as o_proj(saved input); "capture": its saved outputs (a child whose output
    # is not a bare linear's), replayed only in the last stage; "off": everything recomputed
    for mode in ("ending", "capture", "off"):
        no_endings = mock.patch.object(seq, "child_endings", return_value={}) if mode == "capture" else \
            mock.patch.object(seq, "child_endings", wraps=seq.child_endings)
        with mock.patch.object(blocks, "Replay", wraps=blocks.Replay) as replay, no_endings:
            runs[mode] = quantize_model(copy.deepcopy(m), GPTQConfig(), calib_tokens, batch_size=8, progress=False,
                                        reuse_outputs=mode != "off")[0]
        replays[mode] = replay.call_count
    assert replays == {"ending": 8, "capture": 4, "off": 0}  # per stage that replays, x 4 blocks
    for k in runs["off"]:
        assert torch.equal(runs["ending"][k].codes, runs["off"][k].codes), k
        assert torch.equal(runs["capture"][k].codes, runs["off"][k].codes), k


def test_bf16_hessian_is_close_to_fp32_and_still_fp32_accumulated():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 64, generator=g) * torch.rand(64, generator=g) * 4).to(torch.bfloat16)
    exact, fast = seq.HessianAccumulator(64), seq.HessianAccumulator(64, low_precision=True)
    exact.add(x)
    fast.add(x)
    assert fast.H.dtype == torch.float32 and fast.n_tokens == exact.n_tokens == 4096
    rel = float((fast.hessian() - exact.hessian()).norm() / exact.hessian().norm())
    assert 0 < rel < 1e-3  # rounded partial sums (so not the fp32 path), but close
    fp32_input = seq.HessianAccumulator(64, low_precision=True)
    fp32_input.add(x.float())  # only bf16 activations take the bf16 GEMM
    assert torch.equal(fp32_input.H, exact.H)


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


def test_anchor_keeps_the_anchor_on_general_rows_and_the_model_on_task_rows(tiny, calib_tokens):
    """Anchored solve: task rows reproduce ``model``, general rows reproduce the anchor's weights.

    The anchor is a different model (another seed); compared with plain GPTQ of ``model`` over the same
    rows, the anchored export must be closer to the anchor on general inputs, and an anchor equal to the
    model itself must change nothing."""
    from qft.models import load_model

    other = load_model("tiny-llama", dtype=torch.float32, seed=1).eval()
    anchor = {n: m.weight.detach().float() for n, m in other.named_modules() if isinstance(m, nn.Linear)}
    own = {n: m.weight.detach().float().clone() for n, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    task = calib_tokens[:, :32]
    general = torch.randint(5000, 9000, (16, 32), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([task, general])
    cfg = GPTQConfig(bits=4, group_size=64)
    runs = {}
    for name, kw in (("plain", {}), ("anchored", dict(anchor=anchor, anchor_rows=16)),
                     ("self", dict(anchor=own, anchor_rows=16))):
        m = copy.deepcopy(tiny)
        q, _ = quantize_model(m, cfg, tokens, batch_size=8, progress=False, **kw)
        runs[name] = (m, q)
    layer = "model.layers.0.self_attn.q_proj"  # first layer: its inputs do not depend on earlier solves
    x_general = runs["plain"][0].model.embed_tokens(general).reshape(-1, 128)  # its input before the norm
    x_general = tiny.model.layers[0].input_layernorm(x_general)
    err = {k: ((x_general @ (q[layer].dequantize() - anchor[layer]).t()) ** 2).mean().item()
           for k, (_, q) in runs.items() if k != "self"}
    assert err["anchored"] < 0.5 * err["plain"]
    # an anchor equal to the model: the blend is W itself, solved on a grid fitted to W up front
    from qft.export.gptq import gptq_solve, params_for_groups
    attn = tiny.model.layers[0].self_attn
    W = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().float()
    with torch.no_grad():
        x = tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(tokens)).reshape(-1, W.shape[1])
    expected = gptq_solve(W, 2 * x.t() @ x / x.shape[0], cfg, report_error=False, grid=params_for_groups(W, cfg))
    n = attn.q_proj.weight.shape[0]
    same = (runs["self"][1][layer].codes == expected.codes[:n]).float().mean()
    assert same > 0.999  # Hessian sums in another order may flip a rare tie
    with pytest.raises(ValueError, match="anchor_rows"):
        quantize_model(copy.deepcopy(tiny), cfg, tokens, progress=False, anchor=anchor, anchor_rows=0)


def test_reported_errors_are_direct_and_never_negative(tiny, calib_tokens):
    """Issue 15: the quadratic form of a bf16-accumulated Hessian went negative (-0.000228) where the
    error sat in its near-null directions. The report now measures ||(W-Q)X||^2/||WX||^2 on the inputs."""
    from qft.export.gptq import direct_output_error

    m = copy.deepcopy(tiny).to(torch.bfloat16)  # bf16 activations: the low-precision Hessian path
    tokens = calib_tokens[:, :32]
    q, rows = quantize_model(m, GPTQConfig(bits=4, group_size=64), tokens, batch_size=8, progress=False)
    assert rows and all(r["rel_output_error"] >= 0 for r in rows)
    # the first layer's inputs do not depend on earlier solves: recompute its error on all of them
    layer = tiny.model.layers[0]
    with torch.no_grad():  # the norm and embedding are not quantized: m computes the inputs the solve saw
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(tokens)).float().reshape(-1, 128)
    row = next(r for r in rows if r["layer"] == "model.layers.0.self_attn.q_proj")
    W = layer.self_attn.q_proj.weight.detach().to(torch.bfloat16).float()
    direct = direct_output_error(W, q["model.layers.0.self_attn.q_proj"].dequantize(), x)
    assert row["rel_output_error"] == pytest.approx(direct, rel=0.05)
