"""``make demo`` end to end on tiny-llama: both roads, summary.json, no overwrite."""
import json

import pytest

from qft import demo


def _run(out, *extra, qat_start=("--qat-start", "2")):
    return demo.main(["--model", "tiny-llama", "--steps", "4", *qat_start, "--batch-size", "2",
                      "--calib-samples", "4", "--calib-len", "32", "--out", str(out), *extra])


def test_demo_runs_both_roads_and_refuses_to_overwrite(tmp_path, capfd):
    out = tmp_path / "d"
    res = _run(out, "--wikitext", str(tmp_path / "absent.raw"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res))
    assert set(summary["rows"]) == {"qlora", "trained", "hf_recipe", "qft"}
    for r in summary["rows"].values():
        assert 0 <= r["acc_1000"] <= 1 and 0 <= r["acc_1000_se"] <= 0.016
        assert r["wikitext_ppl"] is None  # no WikiText file given
    for road in ("hf_recipe", "qft"):
        e = summary["exports"][road]
        assert (out / e["path"].rsplit("/", 1)[-1] / "model.safetensors").is_file() and e["bytes"] > 0
        assert e["export_s"] >= 0
    # the checkpoint is the model as trained: the same grid, so the same logits up to the fp16 the tiny
    # model's embeddings are saved in (it trains in fp32; SmolLM2 trains and saves in bf16: equal there)
    q = summary["exports"]["qft"]
    assert isinstance(q["matches_trained"], bool) and q["max_logit_diff"] < 1e-3
    assert summary["grid_solve"]["step"] == 2 and summary["grid_solve"]["layers"] == 4 * 7
    assert summary["general_ability_protected"] is False
    qft = json.loads((out / "qft-int4" / "qft_export.json").read_text())
    hf = json.loads((out / "hf-recipe-int4" / "qft_export.json").read_text())
    assert qft["qat_grid"] == "keep" and qft["learned_layers"] == 4 * 7  # the trained grid, no solve
    assert hf["merge_into"] == "original" and hf["learned_layers"] == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "step 4/4" in printed  # progress lines during the fit
    everything = captured.out + captured.err  # library noise is silenced (qft.console)
    assert not any(n in everything for n in ("eval mode", "Tip:", "GPU available", "Loading weights"))
    assert "Hugging Face's recipe" in printed and "qft (the grid as trained)" in printed
    assert "general ability was not protected" in printed and "bit for bit" in printed
    with pytest.raises(FileExistsError, match="never overwrites"):
        _run(out)


def test_demo_refuses_a_solve_step_outside_the_fit_before_any_work(tmp_path, capsys):
    for bad in ("5", "-1"):
        with pytest.raises(SystemExit):
            _run(tmp_path / "d", qat_start=("--qat-start", bad))
        err = capsys.readouterr().err
        assert f"--qat-start {bad}" in err and "[0, --steps=4]" in err
    assert not (tmp_path / "d").exists()


def test_demo_measures_wikitext_when_present(tmp_path, shared_data):
    res = _run(tmp_path / "d", "--wikitext", str(shared_data / "wikitext2_test.raw"), qat_start=())
    assert res["qat_start"] == 4 and res["grid_solve"]["step"] == 4  # by default, solved at the fit's end
    assert res["calibration"] == "task+wikitext" and res["general_ability_protected"] is True
    assert res["grid_solve"]["general_rows"] == 1  # a quarter of 4 windows, anchored to the base
    assert res["exports"]["qft"]["qat_grid"] == "keep" and res["exports"]["qft"]["max_logit_diff"] < 1e-3
    assert res["exports"]["hf_recipe"]["general_target"] == "trained"
    for r in res["rows"].values():
        assert r["wikitext_ppl"] > 1
