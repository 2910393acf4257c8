"""The benchmark scripts' aggregation math (the figures BENCHMARKS.md quotes come from these functions) and
how they write their results."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prilora_summary_means_stds_and_paired_ratios():
    bench = _load("prilora_vs_lora")
    runs = [dict(task="synthetic", method="lora", seed=0, eval_loss=1.0, eval_accuracy=0.8, step_time_s=1.0,
                 peak_rss_mb=100.0, nonzero_adapter_params_at_end=80),
            dict(task="synthetic", method="lora", seed=1, eval_loss=2.0, eval_accuracy=0.6, step_time_s=1.0,
                 peak_rss_mb=100.0, nonzero_adapter_params_at_end=80),
            dict(task="synthetic", method="prilora", seed=0, eval_loss=1.1, eval_accuracy=0.7, step_time_s=1.2,
                 peak_rss_mb=110.0, nonzero_adapter_params_at_end=60),
            dict(task="synthetic", method="prilora", seed=1, eval_loss=1.8, eval_accuracy=0.7, step_time_s=1.2,
                 peak_rss_mb=110.0, nonzero_adapter_params_at_end=60)]
    s = bench.summarize(runs)["synthetic"]
    assert s["lora"]["eval_loss_mean"] == pytest.approx(1.5)
    assert s["lora"]["eval_loss_std"] == pytest.approx(0.5 ** 0.5)  # sample std of (1, 2)
    assert s["prilora"]["eval_loss_vs_lora"] == pytest.approx(1.45 / 1.5)
    assert s["prilora"]["eval_loss_paired_ratio"] == pytest.approx((1.1 / 1.0 + 1.8 / 2.0) / 2)
    assert s["prilora"]["nonzero_adapter_params_at_end_vs_lora"] == pytest.approx(0.75)
    assert s["prilora"]["seeds"] == [0, 1]
    assert "| prilora |" in bench.table(bench.summarize(runs))


def test_prilora_cli_refuses_bad_lists(tmp_path, capsys):
    bench = _load("prilora_vs_lora")
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "r.json"), "--methods", "lora,dora"])
    assert "--methods" in capsys.readouterr().err


def test_result_file_writes_whole_files_and_never_replaces_unasked(tmp_path):
    write_result = _load("result_file").write_result
    out = tmp_path / "sub" / "r.json"
    figures = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "machine_info"}  # noqa: E731
    write_result(out, {"ppl": 1.5})
    assert figures(out) == {"ppl": 1.5}
    machine = json.loads(out.read_text())["machine_info"]  # every result says which CPU it ran on
    assert machine["cpu"] and set(machine["flags"]) >= {"avx512_bf16", "amx_int8", "amx_bf16", "amx_tile"}
    with pytest.raises(SystemExit, match="appeared while the benchmark ran") as err:
        write_result(out, {"ppl": 2.0})
    kept = Path(str(err.value).rsplit(" in ", 1)[1].rstrip("."))
    assert figures(kept) == {"ppl": 2.0}  # this run's figures are not lost
    assert figures(out) == {"ppl": 1.5}  # nor the recorded ones
    kept.unlink()
    write_result(out, {"ppl": 3.0}, replace=True)
    assert figures(out) == {"ppl": 3.0}
    with pytest.raises(TypeError):
        write_result(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.json", "sub"]  # no temporary left behind


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").is_file(),
                    reason="needs ../shared/data/tinyshakespeare.txt (the reference data)")
def test_qat_recovery_step_time_only_trains_in_lockstep_and_stops_before_ptq(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/qat_recovery.py` has it
    out = tmp_path / "steps.json"
    _load("qat_recovery").main(["--out", str(out), "--model", "tiny-llama", "--steps", "2", "--batch-size", "1",
                                "--seq-len", "32", "--eval-tokens", "32", "--torchao", "off", "--step-time-only",
                                "--lsq-lr-mult", "10", "--mse-lr-mult", "0.5", "--solve-at", "0", "0.5"])
    res = json.loads(out.read_text())
    arms = {"plain", "qat_int4", "qat_int3", "qat_int4_lrx10", "qat_int4_mse_lrx0.5", "solved_int4_at0",
            "solved_int4_at1"}
    assert {k: len(v) for k, v in res["step_times_s"].items()} == dict.fromkeys(arms, 2)
    for arm in ("qat_int4", "qat_int3"):
        assert res["step_time_ratio"][arm] == pytest.approx(res["step_s"][arm] / res["step_s"]["plain"])
    t = res["step_times_s"]  # a solved arm's ratio is over the steps on its grid only
    assert res["step_time_ratio"]["solved_int4_at1"] == pytest.approx(t["solved_int4_at1"][1] / t["plain"][1])
    assert res["step_time_ratio"]["solved_int4_at0"] == pytest.approx(
        statistics.median(t["solved_int4_at0"]) / statistics.median(t["plain"]))
    assert "fp_ppl" not in res and "int4" not in res  # no evaluation or PTQ after the training


def test_qat_recovery_optimizer_puts_the_learned_scales_at_their_own_lr(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load("qat_recovery")
    from qft.models import load_model
    from qft.qat import prepare

    model = load_model("tiny-llama")
    prepare(model, bench.qat_config(4, 16, range_learning=True))
    opt = bench.optimizer(model, 1e-4, 10.0)
    scales = {id(p) for m in model.modules() if hasattr(m, "qat_params") for p in m.qat_params()}
    assert scales and [g["lr"] for g in opt.param_groups] == [1e-4, pytest.approx(1e-3)]
    assert {id(p) for p in opt.param_groups[1]["params"]} == scales
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)  # every trainable tensor, once
