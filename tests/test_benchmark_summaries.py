"""The benchmark scripts' aggregation math: the figures BENCHMARKS.md quotes come from these functions."""
import importlib.util
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
