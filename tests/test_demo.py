"""``make demo``'s pipeline end to end on tiny-llama: base -> NF4 QLoRA + PRILoRA -> merge -> GPTQ int4."""
from pathlib import Path

import pytest

from qft import demo


@pytest.mark.parametrize("merge_into", ["original", "dequantized_nf4"])
def test_demo_pipeline_runs_and_refuses_to_overwrite(tmp_path, merge_into):
    out = tmp_path / "d"
    args = ["--model", "tiny-llama", "--steps", "2", "--batch-size", "2", "--num-val", "2", "--calib-samples", "2",
            "--out", str(out), "--merge-into", merge_into]
    res = demo.main(args)
    assert {"acc_base", "acc_qlora", "acc_int4"} <= res.keys()
    assert all(0.0 <= res[k] <= 1.0 for k in ("acc_base", "acc_qlora", "acc_int4"))
    ckpt = out / "gptq-int4"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert f'"merge_into": "{merge_into}"' in (ckpt / "qft_export.json").read_text()
    with pytest.raises(FileExistsError, match="never overwrites"):
        demo.main(args)
    assert Path(res["out"]) == out
