"""SmoothQuant: the pairs are found by running the model, folding keeps the function, outliers shrink."""
import torch

from qft.ptq.calibrate import input_absmax
from qft.ptq.model import decoder_linears
from qft.ptq.smoothquant import norm_feeds, smooth, smoothing_scales

from ptq_helpers import logits


def test_norm_feeds_finds_the_norm_fed_linears_of_every_block(tiny, calib_tokens):
    pairs = dict(norm_feeds(tiny, decoder_linears(tiny), calib_tokens[:1, :16]))
    assert len(pairs) == 2 * 4  # input_layernorm and post_attention_layernorm of 4 blocks
    head = "model.layers.0."
    assert pairs[head + "input_layernorm"] == [head + "self_attn.q_proj", head + "self_attn.k_proj",
                                               head + "self_attn.v_proj"]
    assert pairs[head + "post_attention_layernorm"] == [head + "mlp.gate_proj", head + "mlp.up_proj"]


def test_scales_follow_the_papers_formula():
    a, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))  # sqrt(a / w); a silent channel keeps 1


def test_folding_keeps_the_function_and_evens_out_the_channels(tiny, calib_tokens):
    ids = calib_tokens[:2]
    ref = logits(tiny, ids)
    lins = decoder_linears(tiny)
    pairs = norm_feeds(tiny, lins, calib_tokens[:1, :16])
    heads = {names[0]: lins[names[0]] for _, names in pairs}
    # make channel 3 an outlier, as in real LLMs: the norm's weight carries it
    for norm, _ in pairs:
        with torch.no_grad():
            tiny.get_submodule(norm).weight[3] *= 30
    ref = logits(tiny, ids)
    before = input_absmax(tiny, calib_tokens, heads)
    smooth(tiny, lins, before, pairs, alpha=0.5)
    after = input_absmax(tiny, calib_tokens, heads)
    torch.testing.assert_close(logits(tiny, ids), ref, rtol=1e-4, atol=1e-4)
    ratio = lambda m: float(m.max() / m.median())  # noqa: E731
    assert all(ratio(after[n]) < ratio(before[n]) / 3 for n in heads)
