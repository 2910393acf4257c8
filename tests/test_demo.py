"""``make demo`` end to end on tiny-llama: both roads, summary.json, no overwrite."""
import json

import pytest

from qft import demo


def _run(out, *extra):
    return demo.main(["--model", "tiny-llama", "--steps", "4", "--qat-start", "2", "--batch-size", "2", "--num-val", "2",
                      "--calib-samples", "4", "--calib-len", "32", "--out", str(out), *extra])


def test_demo_runs_both_roads_and_refuses_to_overwrite(tmp_path, capfd):
    out = tmp_path / "d"
    res = _run(out, "--wikitext", str(tmp_path / "absent.raw"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res))
    assert {"acc_base", "acc_qlora", "steps", "seconds", "exports"} <= summary.keys()
    for road in ("hf_recipe", "qft"):
        e = summary["exports"][road]
        assert {"acc", "wikitext_ppl", "bytes", "path"} <= e.keys() and 0 <= e["acc"] <= 1
        assert e["wikitext_ppl"] is None  # no WikiText file given
        assert (out / e["path"].rsplit("/", 1)[-1] / "model.safetensors").is_file() and e["bytes"] > 0
    qft = json.loads((out / "qft-int4" / "qft_export.json").read_text())
    hf = json.loads((out / "hf-recipe-int4" / "qft_export.json").read_text())
    assert qft["qat_grid"] == "keep" and qft["learned_layers"] == 4 * 7  # the learned grid, no solve
    assert hf["merge_into"] == "original" and hf["learned_layers"] == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "step 4/4" in printed  # progress lines during the fit
    everything = captured.out + captured.err  # library noise is silenced (qft.console)
    assert not any(n in everything for n in ("eval mode", "Tip:", "GPU available", "Loading weights"))
    assert "Hugging Face's recipe" in printed and "qft quantization-aware" in printed
    with pytest.raises(FileExistsError, match="never overwrites"):
        _run(out)


def test_demo_measures_wikitext_when_present(tmp_path, shared_data):
    res = _run(tmp_path / "d", "--wikitext", str(shared_data / "wikitext2_test.raw"))
    assert res["calibration"] == "task+wikitext"
    assert (res["exports"]["qft"]["qat_grid"], res["exports"]["qft"]["general_target"]) == ("refine", "base")
    assert res["exports"]["hf_recipe"]["general_target"] == "trained"
    for road in ("hf_recipe", "qft"):
        assert res["exports"][road]["wikitext_ppl"] > 1
