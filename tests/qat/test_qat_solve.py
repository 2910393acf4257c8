"""A grid solved at QAT start (``QATConfig.init``, ``qft.qat.solve``): refused inputs, the fixed grid,
the low-rank straight-through backward, and the fit that ends on the grid the export writes."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qft.qat import GridSolve, QATCallback, QATConfig
from qft.qat.fake_quant import grouped, ste_fake_quant
from qft.qat.layer import FakeQuantLinear, FakeQuantLoRALinear
from qft.quant import QuantScheme

SCHEME = QuantScheme(bits=4, group_size=32)


@pytest.mark.parametrize("init,match", [
    ({"general_calibration": "/no/such/file.txt"}, r"general_calibration='/no/such/file.txt'\)\): no such file"),
    ({"general_fraction": 1.5}, r"general_fraction=1.5\)\): a number in \[0, 1\]"),
    ({"general_fraction": -0.1}, r"general_fraction=-0.1\)\): a number in \[0, 1\]"),
    ({"general_start": 1.0}, r"general_start=1.0\)\): a number in \[0, 1\)"),
    ({"method": "awq"}, r"method='awq'\)\): allowed \['gptq', 'rtn'\]"),
    ({"n_samples": 0}, r"n_samples=0\)\): an integer >= 1"),
    ("sometimes", r"init='sometimes'\): allowed 'minmax'"),
])
def test_bad_solve_settings_are_refused_when_the_callback_is_built(init, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        QATCallback(weight=SCHEME, init=init)


def test_an_empty_general_text_file_is_refused(tmp_path):
    empty = tmp_path / "general.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"GridSolve\(general_calibration=.*general.txt'\)\): the file is empty"):
        QATCallback(init={"general_calibration": str(empty)})


def test_a_solved_grid_refuses_learned_scales_and_unmerged_adapters():
    with pytest.raises(ValueError, match="range_learning would learn new ones"):
        QATConfig(init="gptq", range_learning=True)
    with pytest.raises(ValueError, match="lora_merged=None"):
        QATConfig(init="gptq", lora_merged=False)


def test_init_reads_from_yaml_dicts_and_round_trips():
    c = QATConfig(init={"method": "gptq", "general_fraction": 0.5})
    assert c.solve == GridSolve(general_fraction=0.5)
    assert QATConfig(**{**c.to_dict(), "weight": c.weight}).solve == c.solve
    assert QATConfig().solve is None and QATConfig(init="minmax").to_dict()["init"] == "minmax"


def _lora_layer(seed=0):
    """A peft-like LoRA layer over a plain linear, wrapped by QAT (merged)."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 32, bias=False)

    torch.manual_seed(seed)
    lora = get_peft_model(One(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])).base_model.model.proj
    nn.init.normal_(lora.lora_B["default"].weight, std=0.05)
    return FakeQuantLoRALinear(lora, SCHEME)


def _rtn(layer):
    from qft.export.config import GPTQConfig
    from qft.export.gptq import rtn_solve
    from qft.layers import weight

    return rtn_solve(weight(layer), GPTQConfig(bits=4, group_size=32))


def test_fix_grid_starts_on_the_solved_codes_and_keeps_them():
    layer = _lora_layer()
    qw = _rtn(layer)
    layer.fix_grid(qw)
    assert layer.fixed_grid
    assert torch.equal(layer.quantized_weight().codes, qw.codes)  # the weight starts on the solved codes
    # base + adapters (what merge and export read) is the solved grid's weight
    assert torch.allclose(layer.latent_weight(), qw.dequantize(), atol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)
    scale = layer.weight_scale.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.01)  # training moves the adapters, never the grid
    assert torch.equal(layer.quantized_weight().scale, scale)


def test_the_low_rank_backward_is_the_straight_through_gradient():
    """Where nothing is clamped, the gradient the adapters and the input get equals that of
    ``F.linear(x, ste_fake_quant(W + s B A))`` with the full weight gradient."""
    layer = _lora_layer()
    layer.fix_grid(_rtn(layer))
    x = torch.randn(5, 64, requires_grad=True)
    target = torch.randn(5, 32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    ((layer(x) - target) ** 2).sum().backward()
    low_rank = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    w = layer.latent_weight()
    fq = ste_fake_quant(grouped(w, 32), layer.weight_scale.unsqueeze(-1), layer.weight_zero.unsqueeze(-1), 15)
    assert bool((fq.reshape(w.shape) != 0).any())
    ((nn.functional.linear(x, fq.reshape(w.shape)) - target) ** 2).sum().backward()
    for got, want in zip(low_rank, (x.grad, A.grad, B.grad)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_solved_grid_travels_in_the_state_dict():
    layer = _lora_layer()
    layer.fix_grid(_rtn(layer))
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.02)
    fresh = _lora_layer(seed=1)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.fixed_grid
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.quantized_weight().codes, layer.quantized_weight().codes)


def test_a_plain_weight_is_written_onto_the_grid():
    torch.manual_seed(0)
    layer = FakeQuantLinear(nn.Linear(64, 32), SCHEME)
    qw = _rtn(layer)
    layer.fix_grid(qw)
    assert torch.equal(layer.weight.data, qw.dequantize())
    assert torch.equal(layer.quantized_weight().codes, qw.codes)


def test_a_bare_hugging_face_model_is_solved_as_the_export_would(calib_tokens):
    """``solve_and_install`` takes a plain HF model (a fine-tune script without Lightning) as well as a
    LightningModule; its grid is the one GPTQ export gives the same weights, and the model computes it."""
    from qft.export.config import GPTQConfig
    from qft.export.sequential import quantize_model
    from qft.models import load_model
    from qft.qat import prepare
    from qft.qat.prepare import fake_quant_modules
    from qft.qat.solve import solve_and_install

    scheme = QuantScheme(bits=4, group_size=64)
    model = load_model("tiny-llama", dtype=torch.float32)
    from qft.export.pipeline import resolve_dtype

    plain = load_model("tiny-llama", dtype=resolve_dtype("auto", torch.device("cpu")))  # the export's compute dtype
    reference, _ = quantize_model(plain, GPTQConfig(bits=4, group_size=64, sym=True), tokens=calib_tokens,
                                  progress=False)
    prepare(model, QATConfig(weight=scheme))
    info = solve_and_install(model, scheme, GridSolve(), calib_tokens, None)
    assert info["layers"] == len(reference) == 4 * 7
    for name, layer in fake_quant_modules(model):
        name = name.removeprefix("model.") if name not in reference else name
        qw = layer.quantized_weight()
        assert layer.fixed_grid and torch.equal(qw.codes, reference[name].codes.to(qw.codes.dtype)), name


class _Perturb(pl.Callback):
    """Rank 1 moves its weights just before the solve, so only a broadcast can make the ranks agree."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1 and trainer.global_rank == 1:
            with torch.no_grad():
                for m in pl_module.body:
                    if hasattr(m, "weight"):
                        m.weight.add_(0.3)


class _Dump(pl.Callback):
    def __init__(self, out):
        self.out = str(out)

    def on_fit_end(self, trainer, pl_module):
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)},
                   f"{self.out}/rank{trainer.global_rank}.pt")


def test_every_gloo_rank_trains_rank_zeros_grid(tmp_path):
    from qat_helpers import TinyNet

    cb = QATCallback(weight=SCHEME, start_step=1, init="rtn")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[_Perturb(), cb, _Dump(tmp_path)],
                         default_root_dir=tmp_path)
    trainer.fit(TinyNet())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any("weight_scale" in k for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k



def test_a_grid_due_at_max_steps_is_solved_when_training_ends(tmp_path):
    """start_step == max_steps: no batch reaches the solve, so on_train_end solves it; the fit ends on
    the grid (fake-quant on, every layer fixed) with no step trained on it."""
    from qat_helpers import TinyNet

    from qft.qat.prepare import fake_quant_modules

    seen = []

    class _Watch(pl.Callback):
        def on_fit_end(self, trainer, pl_module):  # what an export callback at fit end finds
            mods = fake_quant_modules(pl_module)
            seen.append((len(mods), all(m.fixed_grid and bool(m.qat_enabled) for _, m in mods)))

    cb = QATCallback(weight=SCHEME, start_step=4, init="rtn")
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[cb, _Watch()], default_root_dir=tmp_path)
    net = TinyNet()
    trainer.fit(net)
    assert cb.solved["step"] == 4 and seen == [(2, True)]
    layer = net.body[0]  # a plain weight is written onto the grid: fake-quant leaves it as it is
    w = layer.weight.detach().float()
    assert torch.equal(layer.fake_quant_weight(w), w)
