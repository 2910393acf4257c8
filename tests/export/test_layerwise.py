"""The layer-wise export (one block at a time from disk) writes what the in-memory export writes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qft.export import cli, load_quantized


@pytest.fixture()
def calib_file(tmp_path, calib_text):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(calib_text))
    return f


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _adapter(tmp_path, quantization):
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model
    from qft.qlora import quantize_nf4

    base = load_model("tiny-llama")
    if quantization != "none":
        quantize_nf4(base, double_quant=quantization == "nf4-dq")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / f"adapter-{quantization}"
    model.save_pretrained(path)
    (path / "qft_adapter.json").write_text(json.dumps({"model": "tiny-llama", "quantization": quantization}))
    return path


@pytest.mark.parametrize("quantization,offload", [("none", "none"), ("nf4", "disk")])
def test_layerwise_equals_in_memory(tmp_path, calib_file, quantization, offload):
    adapter = _adapter(tmp_path, quantization)
    common = ["--adapter", str(adapter), "--calibration", str(calib_file), "--n-samples", "8", "--seq-len", "64",
              "--group-size", "64", "--no-drift"]
    whole = cli.main([*common, "--output", str(tmp_path / "whole")])
    layerwise = cli.main([*common, "--output", str(tmp_path / "layerwise"), "--layerwise",
                          "--calibration-offload", offload])
    assert layerwise["layerwise"] and layerwise["blocks"] == 4 and layerwise["adapters"] == 28
    assert whole["merged_layers"] == 28
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "layerwise")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    shards = sorted(p.name for p in (tmp_path / "layerwise").glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "layerwise" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "layerwise")(ids).logits,
                                   load_quantized(tmp_path / "whole")(ids).logits, rtol=0, atol=0)


def test_layerwise_refuses_what_it_cannot_do(tmp_path, calib_file):
    adapter = _adapter(tmp_path, "none")
    base = ["--adapter", str(adapter), "--calibration", str(calib_file), "--output", str(tmp_path / "q"), "--layerwise"]
    with pytest.raises(ValueError, match="cannot take --backend gptqmodel"):
        cli.main([*base, "--backend", "gptqmodel"])
    with pytest.raises(ValueError, match="cannot take --general-target base"):
        cli.main([*base, "--general-target", "base", "--general-calibration", str(calib_file)])
    assert not (tmp_path / "q").exists()
