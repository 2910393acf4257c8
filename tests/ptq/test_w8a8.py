"""quantize_w8a8 end to end on tiny-llama: close to fp, written as compressed-tensors, read back the same."""
import json

import pytest
import torch
from ptq_helpers import logits

from qft.export.calibration import CalibrationError
from qft.ptq import W8A8Config, W8A8Linear, load_w8a8, quantize_w8a8, save_w8a8

EVAL = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(7))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [W8A8Config(), W8A8Config(activation="static"),
                                 W8A8Config(activation="static", smoothquant=0.5),
                                 W8A8Config(weight_method="gptq")],
                         ids=["dynamic", "static", "static-sq", "dynamic-gptq"])
def test_w8a8_stays_close_to_fp_and_round_trips(tiny, calib_tokens, tmp_path, cfg):
    ref = logits(tiny, EVAL)
    summary = quantize_w8a8(tiny, cfg, calib_tokens, batch_size=8, progress=False)
    q = {n: m for n, m in tiny.named_modules() if isinstance(m, W8A8Linear)}
    assert len(q) == summary["layers"] == 28
    assert all(m.dynamic == (cfg.activation == "dynamic") for m in q.values())
    got = logits(tiny, EVAL)
    assert _rel(got, ref) < 0.05, _rel(got, ref)
    out = save_w8a8(tiny, tmp_path / "w8a8", cfg, dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["dynamic"] == (cfg.activation == "dynamic")
    assert group["input_activations"]["strategy"] == ("token" if cfg.activation == "dynamic" else "tensor")
    assert qc["ignore"] == ["lm_head"]
    back = load_w8a8(out, dtype=torch.float32)
    torch.testing.assert_close(logits(back, EVAL), got, rtol=0, atol=0)


def test_gptq_weights_fit_the_calibration_outputs_better_than_rtn(calib_tokens):
    from qft.models import load_model

    errs = {}
    for method in ("rtn", "gptq"):
        m = load_model("tiny-llama", dtype=torch.float32).eval()
        w = m.model.layers[1].mlp.down_proj.weight.detach().clone()
        x = []
        h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: x.append(a[0].detach()))
        logits(m, calib_tokens)
        h.remove()
        quantize_w8a8(m, W8A8Config(weight_method=method), calib_tokens, batch_size=8, progress=False)
        X = torch.cat(x).reshape(-1, w.shape[1])
        errs[method] = _rel(X @ m.model.layers[1].mlp.down_proj.dequantized_weight().t(), X @ w.t())
    assert errs["gptq"] < errs["rtn"], errs


def test_calibration_is_required_only_when_asked_for(tiny):
    with pytest.raises(CalibrationError, match="activation='static'"):
        quantize_w8a8(tiny, W8A8Config(activation="static"), None)
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing changed
    quantize_w8a8(tiny, W8A8Config(), None, progress=False)  # dynamic + RTN: no data at all
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, W8A8Linear)


def test_the_file_decompresses_with_compressed_tensors_to_our_weights(tiny, tmp_path):
    pytest.importorskip("compressed_tensors", reason="needs the w8a8 extra: pip install 'qft[w8a8]'")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    cfg = W8A8Config()
    quantize_w8a8(tiny, cfg, None, progress=False)
    out = save_w8a8(tiny, tmp_path / "w8a8", cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.load_from_registry(qc["format"])
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj"
    part = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
    assert part["weight"].dtype == torch.int8 and part["weight_scale"].shape == (128, 1)
    dense = compressor.decompress(part, scheme)["weight"]
    torch.testing.assert_close(dense.float(), tiny.get_submodule(name).dequantized_weight())


def test_an_existing_output_is_never_overwritten(tiny, tmp_path):
    cfg = W8A8Config()
    quantize_w8a8(tiny, cfg, None, progress=False)
    (tmp_path / "w8a8").mkdir()
    (tmp_path / "w8a8" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_w8a8(tiny, tmp_path / "w8a8", cfg)
    assert (tmp_path / "w8a8" / "keep.txt").read_text() == "mine"
