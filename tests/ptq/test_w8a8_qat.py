"""QAT -> W8A8 round trip: a model trained with ``activation=`` exports the grid and ranges it learned."""
from __future__ import annotations

import json

import pytest
import torch
from ptq_helpers import logits
from safetensors.torch import load_file

from qft.ptq import W8A8Config, load_w8a8
from qft.ptq.export import export_w8a8
from qft.quant import QuantScheme

INT8 = QuantScheme(bits=8, granularity="per_channel", symmetric=True)
ACTS = {"dynamic": QuantScheme(bits=8, granularity="per_token", dynamic=True),
        "static": QuantScheme(bits=8, granularity="per_tensor", symmetric=True)}
EVAL = torch.randint(0, 5000, (2, 40), generator=torch.Generator().manual_seed(3))


def _trained(activation, weight=INT8, steps=3, **kw):
    """tiny-llama fine-tuned with int8 fake-quant weights and inputs for a few real steps."""
    from qft.models import load_model
    from qft.qat import QATConfig, prepare

    model = load_model("tiny-llama", dtype=torch.float32)
    prepare(model, QATConfig(weight=weight, activation=activation, observer_momentum=0.5, **kw))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 5000, (2, 32), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", params=list(ACTS))
def qat_model(request):
    return request.param, _trained(ACTS[request.param])


def test_the_checkpoint_computes_what_the_fake_quant_model_computed(qat_model, tmp_path, tokenizer):
    mode, model = qat_model
    trained = logits(model, EVAL)
    summary = export_w8a8(model, tokenizer, None, tmp_path / "w8a8", W8A8Config(activation=mode), progress=False,
                          save_dtype="float32")
    assert summary["qat_grid"] == "keep" and summary["calibration"] is None  # nothing measured: no data needed
    assert summary["learned_layers"] == 28 and summary["learned_input_scales"] == (28 if mode == "static" else 0)
    back = load_w8a8(tmp_path / "w8a8", dtype=torch.float32)
    got = logits(back, EVAL)
    assert torch.equal(got, trained)  # the same integers and scales, multiplied the same way: bit for bit
    # and the codes are the fake-quant layer's own
    sd = load_file(str(tmp_path / "w8a8" / "model.safetensors"))
    layer = model.model.layers[2].mlp.down_proj
    qw = layer.quantized_weight()
    assert torch.equal(sd["model.layers.2.mlp.down_proj.weight"], (qw.codes - 128).to(torch.int8))
    if mode == "static":
        scale = layer.input_quant.grid().scale
        assert torch.equal(sd["model.layers.2.mlp.down_proj.input_scale"].float().reshape(1), scale)
    qc = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] == (mode == "dynamic")


def test_resolve_quantizes_the_merged_weights_anew(qat_model, tmp_path, tokenizer, calib_tokens):
    mode, model = qat_model
    summary = export_w8a8(model, tokenizer, calib_tokens, tmp_path / "new", W8A8Config(activation=mode),
                          progress=False, qat_grid="resolve")
    assert summary["qat_grid"] is None and summary["learned_layers"] == 0


def test_a_clashing_activation_mode_is_refused_before_any_work(qat_model, tmp_path, tokenizer):
    trained_mode, model = qat_model
    other = next(m for m in ACTS if m != trained_mode)
    with pytest.raises(ValueError, match=f"trained its inputs on .*here: {trained_mode}"):
        export_w8a8(model, tokenizer, None, tmp_path / "x", W8A8Config(activation=other), progress=False)
    assert not (tmp_path / "x").exists()


def test_grids_a_w8a8_checkpoint_cannot_hold_are_refused(tmp_path, tokenizer, calib_tokens):
    int4 = _trained(None, weight=QuantScheme(bits=4, group_size=64), steps=1)
    with pytest.raises(ValueError, match="4-bit group-64 weight grid.*--format gptq"):
        export_w8a8(int4, tokenizer, None, tmp_path / "a", W8A8Config(), progress=False)
    weight_only = _trained(None, steps=1)  # int8 weights only: inputs are quantized per token, the grid kept
    s = export_w8a8(weight_only, tokenizer, None, tmp_path / "b", W8A8Config(), progress=False)
    assert s["learned_layers"] == 28
    with pytest.raises(ValueError, match="SmoothQuant"):
        export_w8a8(weight_only, tokenizer, calib_tokens, tmp_path / "c", W8A8Config(smoothquant=0.5), progress=False)


def test_an_observer_that_saw_nothing_has_no_range_to_write(tmp_path, tokenizer):
    model = _trained(ACTS["static"], steps=0)
    with pytest.raises(ValueError, match="seen no training batch"):
        export_w8a8(model, tokenizer, None, tmp_path / "x", W8A8Config(activation="static"), progress=False)


def test_the_callback_follows_qat_in_one_fit_and_the_cli_agrees(tmp_path):
    """QATCallback(activation=static) + W8A8ExportCallback in one Trainer.fit, on an NF4 + LoRA base: the
    export follows the trained mode, writes the learned ranges, and the file reproduces the trained model.
    ``qft export --format w8a8 --ckpt`` of the run's Lightning checkpoint then writes the same tensors."""
    import argparse

    import pytorch_lightning as pl

    from qft.data import QFTDataModule
    from qft.export import cli
    from qft.module import CausalLMModule
    from qft.ptq.callback import W8A8ExportCallback
    from qft.qat import QATCallback

    module = CausalLMModule(model="tiny-llama", compute_dtype="float32", lr=1e-2, lora_r=4, quantization="nf4",
                            adapter="lora")
    export = W8A8ExportCallback(tmp_path / "w8a8", save_dtype="float32", progress=False)
    data = QFTDataModule(task="synthetic", seq_len=64, batch_size=4, num_train=16, num_val=4)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path,
                         callbacks=[export, QATCallback(weight=INT8, activation=ACTS["static"]), ckpt])
    trainer.fit(module, datamodule=data)
    assert export.config.activation == "static" and export.tokens is None  # nothing to calibrate
    assert export.summary["learned_input_scales"] == 28
    x = EVAL[:, :24]
    module.model.eval()
    assert torch.equal(logits(load_w8a8(export.checkpoint_path, dtype=torch.float32), x), logits(module.model, x))
    assert export.state_dict()["checkpoint_path"] == export.checkpoint_path

    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    parser = cli.add_arguments(argparse.ArgumentParser())
    summary = cli.run(parser.parse_args(["--ckpt", str(path), "--output", str(tmp_path / "cli"), "--format", "w8a8",
                                         "--save-dtype", "float32"]))
    assert summary["config"]["activation"] == "static" and summary["learned_input_scales"] == 28
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("w8a8", "cli"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_callback_refuses_a_4bit_qat_grid_before_training(tmp_path):
    import pytorch_lightning as pl

    from qft.data import QFTDataModule
    from qft.module import CausalLMModule
    from qft.ptq.callback import W8A8ExportCallback
    from qft.qat import QATCallback

    with pytest.raises(ValueError, match="activation='hourly'"):
        W8A8ExportCallback(tmp_path / "x", activation="hourly")
    module = CausalLMModule(model="tiny-llama", compute_dtype="float32", lr=1e-2)
    data = QFTDataModule(task="synthetic", seq_len=64, batch_size=4, num_train=8, num_val=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[W8A8ExportCallback(tmp_path / "w8a8"),
                                    QATCallback(weight=QuantScheme(bits=4, group_size=64))])
    with pytest.raises(ValueError, match="4-bit group-64"):
        trainer.fit(module, datamodule=data)
    assert module.global_step == 0 and not (tmp_path / "w8a8").exists()
