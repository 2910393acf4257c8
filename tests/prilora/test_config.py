"""Bad PRILoRA settings fail at construction with a message naming the argument and the value."""
import pytest

from qft.prilora import PRILoRACallback, PRILoRAConfig


@pytest.mark.parametrize("kwargs, name", [
    (dict(r_start=12, r_end=4), "r_start=12"),
    (dict(r_start=0), "r_start=0"),
    (dict(r_end=0, r_start=0), "r_start=0"),
    (dict(final_sparsity=1.0), "final_sparsity=1.0"),
    (dict(final_sparsity=-0.1), "final_sparsity=-0.1"),
    (dict(interval=0), "interval=0"),
    (dict(start_step=-1), "start_step=-1"),
    (dict(start_step=50, end_step=50), "end_step=50"),
    (dict(ema_beta=1.0), "ema_beta=1.0"),
    (dict(alpha_policy="sqrt"), "alpha_policy='sqrt'"),
    (dict(sparsity_schedule="exp"), "sparsity_schedule='exp'"),
])
def test_bad_settings_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match="allowed") as err:
        PRILoRAConfig(**kwargs)
    assert name in str(err.value)
    with pytest.raises(ValueError):  # the callback validates in __init__ too
        PRILoRACallback(**kwargs)


def test_defaults_are_valid_and_documented():
    cfg = PRILoRAConfig()
    assert (cfg.r_start, cfg.r_end, cfg.final_sparsity, cfg.sparsity_schedule) == (4, 12, 0.5, "cubic")
    text = PRILoRAConfig.help()
    for knob in ("r_start", "r_end", "alpha_policy", "final_sparsity", "start_step", "end_step", "interval",
                 "ema_beta", "regrow"):
        assert f"\n{knob}=" in "\n" + text


def test_resolve_steps_fractions_and_unknown_length():
    assert PRILoRAConfig().resolve_steps(100) == (10, 80)
    assert PRILoRAConfig(start_step=3, end_step=9).resolve_steps(None) == (3, 9)
    with pytest.raises(ValueError, match="max_steps"):
        PRILoRAConfig().resolve_steps(float("inf"))


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(ValueError, match="either"):
        PRILoRACallback(PRILoRAConfig(), r_start=2)
