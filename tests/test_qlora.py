"""The NF4 base built tensor by tensor from disk equals the one quantised from the fp32 model."""
import pytest
import torch

from qft import models
from qft.qlora import load_nf4, quantize_nf4


def _linear4bit(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def _same_codes(a, b):
    qa, qb = _linear4bit(a), _linear4bit(b)
    assert qa.keys() == qb.keys() and len(qa) == 28
    for name in qa:
        wa, wb = qa[name].weight, qb[name].weight
        assert torch.equal(wa.data, wb.data), name  # the packed NF4 codes
        sa, sb = wa.quant_state, wb.quant_state
        assert torch.equal(sa.absmax, sb.absmax) and sa.shape == sb.shape and sa.dtype == sb.dtype, name
        assert (sa.state2 is None) == (sb.state2 is None), name
        if sa.state2 is not None:  # double quantisation: the absmax of the absmax
            assert torch.equal(sa.state2.absmax, sb.state2.absmax) and sa.offset == sb.offset, name


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_streamed_nf4_has_the_codes_of_the_fp32_path(double_quant):
    old = models.load_model("tiny-llama")
    quantize_nf4(old, double_quant=double_quant, compute_dtype=torch.bfloat16)
    new = load_nf4(models.tiny_llama_path(0), double_quant=double_quant, compute_dtype=torch.bfloat16)
    _same_codes(old, new)
    emb = new.get_input_embeddings()
    assert emb.weight.dtype == torch.bfloat16 and new.lm_head.weight is emb.weight  # tied, compute dtype
    assert all(p.dtype == torch.bfloat16 for n, p in new.named_parameters() if "norm" in n)
    assert new.is_loaded_in_4bit and not any(p.requires_grad for p in new.parameters())
    assert not any(p.device.type == "meta" for p in new.parameters())
    assert not any(b.device.type == "meta" for b in new.buffers())


def test_streamed_nf4_in_fp32_computes_what_the_fp32_path_computes():
    old = models.load_model("tiny-llama")
    quantize_nf4(old)
    new = load_nf4(models.tiny_llama_path(0))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, old(ids).logits, rtol=0, atol=0)


def test_the_residual_stream_runs_in_the_compute_dtype():
    """fp32 norms would make every saved activation fp32 (qft.qlora.load_nf4's docstring: 7.6 GB vs 5.9 GB)."""
    new = load_nf4(models.tiny_llama_path(0), compute_dtype=torch.bfloat16)
    with torch.no_grad():
        out = new(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.slow
def test_smollm2_streamed_nf4_has_the_codes_of_the_fp32_path():
    old = models.load_model("smollm2-135m")
    quantize_nf4(old, compute_dtype=torch.bfloat16)
    new = models.load_nf4_model("smollm2-135m", compute_dtype=torch.bfloat16)
    qa, qb = _linear4bit(old), _linear4bit(new)
    assert qa.keys() == qb.keys() and len(qa) == 30 * 7
    assert all(torch.equal(qa[n].weight.data, qb[n].weight.data) for n in qa)
    assert all(torch.equal(qa[n].weight.quant_state.absmax, qb[n].weight.quant_state.absmax) for n in qa)


def test_a_directory_without_safetensors_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_nf4(tmp_path)
