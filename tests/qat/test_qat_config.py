"""Bad QAT settings fail at construction (or, for model-dependent checks, before training) with clear errors."""
import pytest
from torch import nn

from qft.qat import QATCallback, QATConfig
from qft.quant import QuantScheme


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_range_fail_at_construction(bits):
    with pytest.raises(ValueError, match="bits"):
        QATCallback(weight={"bits": bits, "group_size": 32})


def test_unknown_granularity_fails():
    with pytest.raises(ValueError, match="granularity"):
        QATCallback(weight={"bits": 4, "granularity": "per_block"})


def test_activation_grid_rejected_for_weights_and_vice_versa():
    with pytest.raises(ValueError, match="weights are quantized"):
        QATCallback(weight=QuantScheme(bits=8, granularity="per_token", dynamic=True))
    with pytest.raises(ValueError, match="activations"):
        QATCallback(activation=QuantScheme(bits=8, group_size=32))


@pytest.mark.parametrize("kw,match", [
    (dict(start_step=-1), "start_step"),
    (dict(start_step=5, freeze_observers_step=2), "freeze_observers_step"),
    (dict(lr_multiplier=0), "lr_multiplier"),
    (dict(observer_momentum=2.0), "observer_momentum"),
    (dict(range_learning="yes"), "range_learning"),
    (dict(init="mse"), "needs range_learning=True"),
    (dict(init="clip"), "allowed 'minmax'"),
    (dict(targets=[]), "targets"),
    (dict(ignore=[3]), "ignore"),
    (dict(weight="int4"), "weight"),
])
def test_bad_arguments_name_themselves(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QATCallback(**kw)


def test_group_size_not_dividing_in_features_names_the_module():
    model = nn.Sequential()
    model.add_module("good", nn.Linear(128, 64))
    model.add_module("odd", nn.Linear(96, 64))
    cb = QATCallback(weight=QuantScheme(bits=4, group_size=64))
    with pytest.raises(ValueError, match="'odd'.*in_features=96|in_features=96.*'odd'"):
        cb.validate_model(model)
    assert QATCallback(weight=QuantScheme(bits=4, group_size=32)).validate_model(model) == ["good", "odd"]


def test_target_patterns_and_ignore():
    c = QATConfig(targets=["q_proj", "mlp.*"], ignore=["lm_head", "layers.3.*"])
    assert c.is_target("model.layers.0.self_attn.q_proj")
    assert c.is_target("model.layers.0.self_attn.q_proj.base_layer")  # peft wraps the base layer
    assert c.is_target("model.layers.0.mlp.up_proj")
    assert not c.is_target("model.layers.0.self_attn.k_proj")
    assert not c.is_target("model.layers.3.mlp.up_proj")
    assert not QATConfig().is_target("model.lm_head")


def test_config_round_trips_through_dict():
    c = QATConfig(weight=QuantScheme(bits=3, group_size=32, symmetric=False),
                  activation=QuantScheme(bits=8, granularity="per_tensor"), start_step=2)
    again = QATConfig(**c.to_dict())
    assert again.to_dict() == c.to_dict() and again.weight == c.weight and again.activation == c.activation
