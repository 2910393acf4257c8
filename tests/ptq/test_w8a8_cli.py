"""``qft export --format w8a8``: from a trained adapter to a W8A8 checkpoint; bad combinations refused first."""
import json

import pytest
import torch

from qft.export import cli
from qft.export.calibration import CalibrationError
from qft.ptq import load_w8a8


@pytest.fixture()
def adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model

    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture()
def calib_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over a lazy dog while int8 grids round each weight".split()
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (80,), generator=g).tolist())
                           for _ in range(20)))
    return f


def test_static_smoothquant_gptq_from_an_adapter(tmp_path, adapter, calib_file):
    summary = cli.main(["--adapter", str(adapter), "--model", "tiny-llama", "--output", str(tmp_path / "q"),
                        "--format", "w8a8", "--activation", "static", "--smoothquant", "0.5", "--method", "gptq",
                        "--calibration", str(calib_file), "--n-samples", "8", "--seq-len", "64"])
    out = tmp_path / "q"
    assert summary["layers"] == 28 and len(summary["smoothed"]) == 12 and summary["calibration"] == [8, 64]
    recorded = json.loads((out / "qft_export.json").read_text())
    assert recorded["config"]["smoothquant"] == 0.5 and len(recorded["layers_report"]) == 28
    model = load_w8a8(out, dtype=torch.float32)
    assert all(not m.dynamic for n, m in model.named_modules() if type(m).__name__ == "W8A8Linear")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12).unsqueeze(0)).logits).all()


@pytest.mark.parametrize("extra,err,match", [
    (["--bits", "4"], ValueError, "cannot take --bits"),
    (["--layerwise"], ValueError, "cannot take --layerwise"),
    (["--activation", "static", "--method", "rtn"], CalibrationError, "--calibration is required"),
])
def test_w8a8_refuses_before_loading(tmp_path, adapter, extra, err, match):
    with pytest.raises(err, match=match):
        cli.main(["--adapter", str(adapter), "--model", "tiny-llama", "--output", str(tmp_path / "q"),
                  "--format", "w8a8", *extra])
    assert not (tmp_path / "q").exists()


def test_w8a8_flags_without_the_format_are_refused(tmp_path, adapter):
    with pytest.raises(ValueError, match="--smoothquant applies to --format w8a8"):
        cli.main(["--adapter", str(adapter), "--output", str(tmp_path / "q"), "--smoothquant", "0.5"])


def test_dynamic_rtn_needs_no_calibration(tmp_path, adapter):
    cli.main(["--adapter", str(adapter), "--model", "tiny-llama", "--output", str(tmp_path / "q"),
              "--format", "w8a8", "--method", "rtn"])
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
