"""calibration_offload: the cached activations wait elsewhere, the export's result does not change."""
from unittest import mock

import pytest
import torch

import qft.export.offload as offload
from qft.export import GPTQConfig, quantize_model
from qft.export.offload import Offload


@pytest.fixture(scope="module")
def bf16_tiny():
    from qft.models import load_model

    return load_model("tiny-llama", dtype=torch.bfloat16)


def _codes(model, calib, **kw):
    import copy

    q, _ = quantize_model(copy.deepcopy(model), GPTQConfig(), calib, batch_size=4, progress=False, **kw)
    return q


def _anchor(model):
    """The model's own linear weights, nudged: a general-text anchor for the split-Hessian road."""
    from qft.export.blocks import block_linears, find_decoder_blocks

    prefix, blocks = find_decoder_blocks(model)
    g = torch.Generator().manual_seed(3)
    return {f"{prefix}.{i}.{n}": lin.weight.float() + 1e-3 * torch.randn(lin.weight.shape, generator=g)
            for i, b in enumerate(blocks) for n, lin in block_linears(b).items()}


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_codes(bf16_tiny, calib_tokens, tmp_path, mode, anchored):
    extra = dict(anchor=_anchor(bf16_tiny), anchor_rows=4) if anchored else {}
    ref = _codes(bf16_tiny, calib_tokens, **extra)
    with mock.patch.object(offload.torch, "save", wraps=torch.save) as save:
        got = _codes(bf16_tiny, calib_tokens, calibration_offload=mode, offload_dir=tmp_path, **extra)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k].codes, ref[k].codes) and torch.equal(got[k].scale, ref[k].scale), k
    # disk: block inputs, replayed outputs and tail inputs went through files, and every file is gone
    assert (save.call_count > 4 * 3) == (mode == "disk")
    assert list(tmp_path.iterdir()) == []


def test_a_stash_hands_back_what_it_was_given_and_removes_its_files(tmp_path):
    off = Offload("disk", "cpu", tmp_path)
    s = off.stash()
    items = [torch.randn(2, 3).to(torch.bfloat16), (torch.ones(4), None)]
    for it in items:
        s.append(it)
    assert len(s) == 2 and torch.equal(s[0], items[0]) and s[0].dtype == torch.bfloat16
    assert torch.equal(s[1][0], items[1][0]) and s[1][1] is None
    (root,) = tmp_path.iterdir()
    assert len(list(root.rglob("*.pt"))) == 2
    del s
    assert list(root.rglob("*.pt")) == []
    del off
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_offload_is_refused_before_any_work(bf16_tiny, calib_tokens):
    with mock.patch("qft.export.sequential.capture_block_inputs") as capture:
        with pytest.raises(ValueError, match=r"calibration_offload: 'gpu' is not one of \['none', 'cpu', 'disk'\]"):
            quantize_model(bf16_tiny, GPTQConfig(), calib_tokens, calibration_offload="gpu", progress=False)
    capture.assert_not_called()
