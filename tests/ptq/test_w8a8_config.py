"""W8A8Config refuses bad values at construction, naming the argument and what is allowed."""
import pytest

from qft.ptq import W8A8Config


@pytest.mark.parametrize("kw,match", [
    (dict(activation="per_token"), r"activation='per_token'.*\['dynamic', 'static'\]"),
    (dict(smoothquant=1.5), r"smoothquant=1.5.*\[0, 1\]"),
    (dict(smoothquant=True), r"smoothquant=True"),
    (dict(weight_method="awq"), r"weight_method='awq'.*\['rtn', 'gptq'\]"),
    (dict(damp_percent=0), r"damp_percent=0"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        W8A8Config(**kw)


def test_grids_are_the_shared_schemes():
    cfg = W8A8Config(activation="static", smoothquant=0.5, weight_method="gptq")
    assert cfg.weight_scheme.bits == 8 and cfg.weight_scheme.granularity == "per_channel"
    assert cfg.activation_scheme.granularity == "per_tensor" and not cfg.activation_scheme.dynamic
    assert W8A8Config().activation_scheme.granularity == "per_token" and not W8A8Config().needs_calibration
    g = cfg.gptq_config()
    assert (g.bits, g.group_size, g.sym, g.method) == (8, -1, True, "gptq")
