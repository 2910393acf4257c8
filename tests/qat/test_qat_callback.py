"""QATCallback in Lightning: schedule, checkpoints/resume, validate/test after fit, convert, fresh-module load."""
import pytest
import torch
from qat_helpers import TinyNet, trainer

from qft.qat import FakeQuantLinear, QATCallback, restore
from qft.quant import GPTQLinear, QuantScheme

W4 = QuantScheme(bits=4, group_size=32, symmetric=False)
A8 = QuantScheme(bits=8, granularity="per_tensor")


class Probe(__import__("pytorch_lightning").Callback):
    """Records, after each step, whether fake-quant was on and how often the first observer updated."""

    def __init__(self):
        self.enabled, self.updates = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        layer = pl_module.body[0]
        self.enabled.append(bool(layer.qat_enabled))
        self.updates.append(int(layer.input_quant.num_updates))


def test_swap_targets_and_schedule(tmp_path):
    model, probe = TinyNet(), Probe()
    cb = QATCallback(weight=W4, activation=A8, start_step=1, freeze_observers_step=3)
    trainer(tmp_path, [cb, probe], max_epochs=3).fit(model)
    assert isinstance(model.body[0], FakeQuantLinear) and isinstance(model.body[2], FakeQuantLinear)
    assert type(model.lm_head) is torch.nn.Linear  # ignored by default
    assert cb.swapped == ["body.0", "body.2"]
    assert probe.enabled == [False, True, True, True, True, True]
    assert probe.updates == [0, 1, 2, 2, 2, 2]  # off before start_step, frozen from step 3


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_resume_restores_fake_quant_state_exactly(tmp_path):
    kw = dict(weight=W4, activation=A8, start_step=1, freeze_observers_step=3, range_learning=True, lr_multiplier=3.0)
    full = TinyNet()
    trainer(tmp_path / "a", [QATCallback(**kw)], max_epochs=3).fit(full)

    half = TinyNet()
    t1 = trainer(tmp_path / "b", [QATCallback(**kw)], max_epochs=1)
    t1.fit(half)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["callbacks"]["QATCallback"]["last_step"] == 1
    assert "body.0.input_quant.min_val" in saved["state_dict"] and "body.0.weight_scale" in saved["state_dict"]

    resumed, cb = TinyNet(seed=5), QATCallback(**kw)  # different init: everything must come from the checkpoint
    trainer(tmp_path / "c", [cb], max_epochs=3).fit(resumed, ckpt_path=ckpt)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert cb.last_step == 5


def test_learned_scales_get_their_own_lr(tmp_path):
    model = TinyNet(lr=1e-2)
    t = trainer(tmp_path, [QATCallback(weight=W4, range_learning=True, lr_multiplier=10.0)], max_epochs=1)
    t.fit(model)
    groups = [g for g in t.optimizers[0].param_groups if g.get("name") == "qat_scales"]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.1) and groups[0]["weight_decay"] == 0.0
    ids = {id(p) for p in groups[0]["params"]}
    assert ids == {id(model.body[0].weight_scale), id(model.body[0].weight_zero), id(model.body[2].weight_scale),
                   id(model.body[2].weight_zero)}
    other = [p for g in t.optimizers[0].param_groups if g.get("name") != "qat_scales" for p in g["params"]]
    assert not ids & {id(p) for p in other}


def test_validate_and_test_after_fit_use_fake_quant(tmp_path):
    model = TinyNet()
    t = trainer(tmp_path, [QATCallback(weight=W4, activation=A8)], max_epochs=1)
    t.fit(model)
    val = t.validate(model, verbose=False)[0]["val_loss"]
    test = t.test(model, verbose=False)[0]["test_loss"]
    model.eval()
    with torch.no_grad():
        manual = torch.nn.functional.mse_loss(model(model.x), model.y).item()
        model.body[0].qat_enabled.fill_(False)
        unquant = torch.nn.functional.mse_loss(model(model.x), model.y).item()
    assert val == pytest.approx(manual, rel=1e-5) and test == pytest.approx(manual, rel=1e-5)
    assert unquant != pytest.approx(manual, rel=1e-5)


def test_convert_on_fit_end_then_test_and_refit(tmp_path):
    model, cb = TinyNet(), QATCallback(weight=W4, convert_on_fit_end=True)
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(model)
    model.eval()
    assert isinstance(model.body[0], GPTQLinear) and cb.converted
    with torch.no_grad():
        manual = torch.nn.functional.mse_loss(model(model.x), model.y).item()
    assert t.test(model, verbose=False)[0]["test_loss"] == pytest.approx(manual, rel=1e-5)
    with pytest.raises(RuntimeError, match="already converted"):
        trainer(tmp_path, [cb], max_epochs=2).fit(model)


def test_fit_twice_without_convert_continues(tmp_path):
    model, cb = TinyNet(), QATCallback(weight=W4)
    trainer(tmp_path, [cb], max_epochs=1).fit(model)
    layer = model.body[0]
    trainer(tmp_path, [cb], max_epochs=1).fit(model)
    assert model.body[0] is layer  # not swapped twice


def test_qat_checkpoint_loads_into_fresh_module(tmp_path):
    model = TinyNet()
    t = trainer(tmp_path, [QATCallback(weight=W4, activation=A8, range_learning=True)], max_epochs=1)
    t.fit(model)
    ckpt = tmp_path / "qat.ckpt"
    t.save_checkpoint(ckpt)
    model.eval()
    with torch.no_grad():
        expected = model(model.x)

    fresh = TinyNet(seed=3)
    config = restore(fresh, ckpt)
    assert config.weight == W4 and isinstance(fresh.body[0], FakeQuantLinear)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(fresh.x), expected)

    # the Trainer path: a fresh module plus the callback, weights from ckpt_path
    other = TinyNet(seed=4)
    res = trainer(tmp_path, [QATCallback(weight=W4, activation=A8, range_learning=True)]).validate(
        other, ckpt_path=ckpt, verbose=False)
    assert res[0]["val_loss"] == pytest.approx(torch.nn.functional.mse_loss(expected, model.y).item(), rel=1e-5)

    # same keys and shapes, different grid: must not load silently
    bad = QATCallback(weight=QuantScheme(bits=3, group_size=32, symmetric=False), activation=A8, range_learning=True)
    with pytest.raises(ValueError, match="trained with"):
        trainer(tmp_path, [bad]).validate(TinyNet(), ckpt_path=ckpt, verbose=False)
