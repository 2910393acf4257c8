"""Every qft callback composes with every other in one ``Trainer.fit``, or the combination is refused at
set-up, before any training step, with a message that says why and what to use instead.

The matrix (tiny-llama, 4 steps, fp32 so that comparisons are exact):

- base: ``fp`` (LoRA on fp32 weights), ``nf4`` (QLoRA), ``full`` (full fine-tune, no adapter);
- ``PRILoRACallback`` on or off (adapter bases only);
- ``QATCallback``: none, ``plain`` (``lora_merged=False``), ``merged`` (``lora_merged=True``, learned scales),
  ``solved`` (``init="gptq"``: the grid solved at QAT start, then fixed);
- ``DistillationModule(distill={"teacher": "self"})`` or the plain module;
- ``GPTQExportCallback`` always, since every combination must end in a checkpoint that
  ``qft.load_quantized`` runs (``test_cli_export_of_the_full_combination`` covers the post-training
  ``qft export --ckpt`` road).

Each run that trains also saves a Lightning checkpoint, which must load into a fresh module (with
none of the callbacks) and reproduce the trained model.
"""
from __future__ import annotations

import itertools

import pytest
import pytorch_lightning as pl
import torch

BASES = {"fp": dict(adapter="lora"), "nf4": dict(quantization="nf4", adapter="lora"), "full": dict()}
QATS = ("none", "plain", "merged", "solved")
STEPS = 4


def _cells():
    for base, prilora, qat, distill in itertools.product(BASES, (False, True), QATS, (False, True)):
        if base == "full" and (prilora or qat == "plain"):
            continue  # PRILoRA needs adapters; plain and merged QAT are the same without them
        yield pytest.param(base, prilora, qat, distill, id=f"{base}-{'prilora' if prilora else 'lora'}-qat_{qat}-"
                                                        f"{'distill' if distill else 'ce'}")


def _refusal(base, qat, distill):
    """The message a refused combination must show, or None if it must train and export."""
    if qat == "plain" and base != "full":
        return "lora_merged=True"  # a grid under an unmerged adapter is on no trained grid: use the merge
    if base == "full" and distill and qat == "none":
        return "teacher='self'"  # the self-teacher would be the student itself
    if base != "full" and distill and qat == "solved":
        return "name a full-precision teacher"  # adapters trained for a fixed grid mean nothing off it
    return None


class StepCounter(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def _module(base, distill):
    from qft.distill import DistillationModule
    from qft.module import CausalLMModule

    kw = dict(model="tiny-llama", compute_dtype="float32", lr=1e-2, lora_r=4, **BASES[base])
    return DistillationModule(distill={"teacher": "self", "kd_ratio": 0.5}, **kw) if distill else CausalLMModule(**kw)


def _callbacks(tmp_path, prilora, qat):
    from qft.export import GPTQExportCallback
    from qft.prilora import PRILoRACallback
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    cbs = [GPTQExportCallback(tmp_path / "int4", group_size=64, dtype="float32", save_dtype="float32",
                              progress=False, n_samples=4, seq_len=32)]
    if qat == "solved":
        cbs.append(QATCallback(weight=QuantScheme(bits=4, group_size=64), start_step=1,
                               init={"method": "gptq", "n_samples": 4, "seq_len": 32}))
    elif qat != "none":  # listed before PRILoRA on purpose: the order of callbacks must not matter
        cbs.append(QATCallback(weight=QuantScheme(bits=4, group_size=64), start_step=1, range_learning=True,
                               lora_merged=qat == "merged"))
    if prilora:
        cbs.append(PRILoRACallback(r_start=2, r_end=6, final_sparsity=0.5, start_step=1, end_step=3, interval=1))
    return cbs


def _fit(tmp_path, module, callbacks, steps=STEPS):
    from qft.data import QFTDataModule

    data = QFTDataModule(task="synthetic", seq_len=64, batch_size=4, num_train=4 * (steps + 2), num_val=4)
    counter = StepCounter()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_last=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, counter, ckpt], default_root_dir=tmp_path,
                         num_sanity_val_steps=0, limit_val_batches=0)
    return trainer, data, counter, ckpt


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("base,prilora,qat,distill", list(_cells()))
def test_combination(tmp_path, base, prilora, qat, distill):
    from qft.export import load_quantized
    from qft.module import CausalLMModule

    module = _module(base, distill)
    callbacks = _callbacks(tmp_path, prilora, qat)
    trainer, data, counter, ckpt = _fit(tmp_path, module, callbacks)
    refusal = _refusal(base, qat, distill)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            trainer.fit(module, datamodule=data)
        assert counter.steps == 0, "a refused combination must fail before any training step"
        assert not (tmp_path / "int4").exists()
        return

    trainer.fit(module, datamodule=data)
    assert counter.steps == STEPS
    export = callbacks[0]
    x = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = _logits(module.model, x)
    exported = _logits(load_quantized(export.checkpoint_path, dtype=torch.float32), x)
    assert torch.isfinite(exported).all()
    summary = export.summary
    if qat != "none":
        # the learned grid is written as is: the checkpoint computes what the fake-quant model computes
        assert summary["qat_grid"] == "keep" and summary["learned_layers"] == 4 * 7
        assert torch.allclose(exported, trained, atol=1e-5, rtol=0), float((exported - trained).abs().max())
    else:
        assert summary["learned_layers"] == 0
        # the merge into the trained base reproduces the trained model; GPTQ int4 then stays near it (a
        # random 4-layer model with 4 x 32 calibration tokens: a loose bound, measured 0.85-0.99)
        assert summary["drift"]["max_logit_diff"] < 1e-3
        cos = torch.nn.functional.cosine_similarity(exported.flatten(), trained.flatten(), dim=0)
        assert cos > 0.7
    if prilora:
        report = next(cb for cb in callbacks if type(cb).__name__ == "PRILoRACallback").layer_report()
        assert all(r["sparsity"] > 0.4 for r in report)  # pruned, and the pruned A is what was exported

    # the Lightning checkpoint restores the trained model in a fresh module, without any callback
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    fresh = CausalLMModule.load_any(str(path))
    assert type(fresh) is type(module)
    assert torch.allclose(_logits(fresh.model, x), trained, atol=1e-5, rtol=0)


def test_cli_export_of_the_full_combination(tmp_path):
    """NF4 + PRILoRA + merged QAT + self-distillation, fitted without the export callback, then exported
    from its Lightning checkpoint by ``qft export --ckpt``: the same learned grid, bit for bit."""
    from qft.export import cli, load_quantized

    module = _module("nf4", distill=True)
    callbacks = _callbacks(tmp_path, prilora=True, qat="merged")[1:]
    trainer, data, _, ckpt = _fit(tmp_path, module, callbacks)
    trainer.fit(module, datamodule=data)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    parser = cli.add_arguments(__import__("argparse").ArgumentParser())
    summary = cli.run(parser.parse_args(["--ckpt", str(path), "--output", str(tmp_path / "out"),
                                         "--save-dtype", "float32", "--dtype", "float32"]))
    assert summary["qat_grid"] == "keep" and summary["calibration"] is None  # no calibration needed
    x = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    exported = _logits(load_quantized(tmp_path / "out", dtype=torch.float32), x)
    assert torch.allclose(exported, _logits(module.model, x), atol=1e-5, rtol=0)


def test_full_combination_with_general_text_exports_the_anchored_road(tmp_path):
    """NF4 + PRILoRA + merged QAT + self-distillation + export with general text, in one ``Trainer.fit``:
    the export's defaults then keep the learned scales and re-solve the codes, task windows toward the
    fine-tune and general windows toward the released base (``general_target="base"``)."""
    import json

    from qft.export import GPTQExportCallback, load_quantized

    module = _module("nf4", distill=True)
    callbacks = _callbacks(tmp_path, prilora=True, qat="merged")
    general = torch.randint(5000, 9000, (4096,), generator=torch.Generator().manual_seed(2))
    callbacks[0] = GPTQExportCallback(tmp_path / "int4", group_size=64, dtype="float32", save_dtype="float32",
                                      progress=False, n_samples=8, seq_len=32, general_calibration=general)
    trainer, data, counter, _ = _fit(tmp_path, module, callbacks)
    trainer.fit(module, datamodule=data)
    assert counter.steps == STEPS
    s = callbacks[0].summary
    assert (s["qat_grid"], s["general_target"], s["general_rows"], s["learned_layers"]) == ("refine", "base", 2, 28)
    rows = json.loads((tmp_path / "int4" / "quant_report.json").read_text())
    assert {r["method"] for r in rows} == {"qat+gptq"}
    from qft.models import load_model

    x = general[:48].view(2, 24)  # general text: the export must sit nearer the released base than the fine-tune
    exported = _logits(load_quantized(callbacks[0].checkpoint_path, dtype=torch.float32), x)
    base = _logits(load_model("tiny-llama", dtype=torch.float32), x)
    assert torch.isfinite(exported).all()
    assert (exported - base).square().mean() < (_logits(module.model, x) - base).square().mean()


def _export(fmt, out, grid: dict):
    """The callback that writes ``fmt``; ``grid`` is empty when QAT's grid is to be followed."""
    from qft.export import GPTQExportCallback
    from qft.ptq.callback import W8A8ExportCallback

    kw = dict(save_dtype="float32", progress=False, n_samples=4, seq_len=32)
    if fmt == "gguf":
        from qft.export.gguf.callback import GGUFExportCallback

        return GGUFExportCallback(out.with_suffix(".gguf"), quant="Q4_K_M", progress=False, n_samples=4, seq_len=32)
    if fmt == "w8a8":
        return W8A8ExportCallback(out, **kw)
    extra = dict(method="awq") if fmt == "awq" else dict(sparsity=0.5)
    return GPTQExportCallback(out, dtype="float32", **grid, **extra, **kw)


EXPORTS = ("awq", "sparsegpt_int4", "w8a8", "gguf")  # every export format / method besides the default GPTQ


@pytest.mark.parametrize("qat", ["none", "int8", "int4"])
@pytest.mark.parametrize("fmt", EXPORTS)
def test_every_export_format_composes_with_nf4_prilora_qat_and_distillation(tmp_path, fmt, qat):
    """NF4 + PRILoRA + self-distillation (+ merged QAT) + each other export in one ``Trainer.fit``: it
    trains and writes a checkpoint that reads back, or a learned grid the format cannot hold is refused
    at set-up, before any step."""
    from qft.export import load_quantized
    from qft.prilora import PRILoRACallback
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    module = _module("nf4", distill=True)
    grid = {} if qat != "none" else dict(group_size=64, **({"sym": False} if fmt == "awq" else {}))
    export = _export(fmt, tmp_path / "out", grid)
    cbs = [export, PRILoRACallback(r_start=2, r_end=6, final_sparsity=0.5, start_step=1, end_step=3, interval=1)]
    if qat == "int8":
        cbs.append(QATCallback(weight=QuantScheme(bits=8, granularity="per_channel"), start_step=1,
                               activation=QuantScheme(bits=8, granularity="per_token", dynamic=True)))
    elif qat == "int4":
        cbs.append(QATCallback(weight=QuantScheme(bits=4, group_size=64), start_step=1))
    trainer, data, counter, _ = _fit(tmp_path, module, cbs)
    refused = {("awq", "int8"): "AWQ .*4-bit", ("awq", "int4"): "rescales every weight",
               ("sparsegpt_int4", "int8"): "prunes weights", ("sparsegpt_int4", "int4"): "prunes weights",
               ("w8a8", "int4"): "4-bit group-64", ("gguf", "int8"): "no GGUF block format",
               ("gguf", "int4"): "no GGUF block format"}.get((fmt, qat))
    if refused:
        with pytest.raises(ValueError, match=refused):
            trainer.fit(module, datamodule=data)
        assert counter.steps == 0 and not export.output_dir.exists()
        return
    trainer.fit(module, datamodule=data)
    assert counter.steps == STEPS
    x = next(iter(data.val_dataloader()))["input_ids"][:2]  # the task the export calibrated on
    trained = _logits(module.model, x)
    if fmt == "w8a8":
        from qft.ptq import load_w8a8

        exported = _logits(load_w8a8(export.checkpoint_path, dtype=torch.float32), x)
    elif fmt == "gguf":
        from qft.export.gguf import load_gguf

        exported = _logits(load_gguf(export.checkpoint_path), x)
    else:
        exported = _logits(load_quantized(export.checkpoint_path, dtype=torch.float32), x)
    assert torch.isfinite(exported).all()
    if qat == "int8":  # the learned int8 grid and per-token inputs are written as trained
        assert torch.equal(exported, trained)
    else:
        cos = _cosine(exported, trained)
        assert cos > 0.9, float(cos)
    if fmt == "sparsegpt_int4":  # SparseGPT + GPTQ must beat the naive road: magnitude pruning, then RTN
        naive = _logits(_magnitude_rtn(module.model, sparsity=0.5, group_size=64), x)
        assert cos > _cosine(naive, trained), (float(cos), float(_cosine(naive, trained)))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)


@torch.no_grad()
def _magnitude_rtn(trained, sparsity: float, group_size: int):
    """The trained model merged, each decoder linear pruned by magnitude and rounded to the nearest int4."""
    from qft.export.merge import merge_adapters
    from qft.export.prune import magnitude_mask
    from qft.quant import QuantScheme
    from qft.quant.grid import rtn_fake_quant_weight
    from qft.sparsity import decoder_weights

    plain = merge_adapters(trained)
    for w in decoder_weights(plain).values():
        w.copy_(rtn_fake_quant_weight(w * ~magnitude_mask(w, sparsity), QuantScheme(bits=4, group_size=group_size)))
    return plain


@pytest.mark.parametrize("base", ["fp", "nf4"])
@pytest.mark.parametrize("qat", ["merged", "solved", "unmerged"])
def test_gguf_q4_0_keeps_a_g32_qat_grid_with_prilora_and_self_distillation(tmp_path, base, qat):
    """QAT on int4 group 32 (GGUF's Q4_0) + PRILoRA + self-distillation on an fp or NF4 base, exported by
    GGUFExportCallback(quant="Q4_0") in the same fit: with the adapters merged into the fake-quant weight
    (min-max scales, or a grid solved at QAT start) the file holds the trained codes and scales bit for
    bit; with the adapters outside the grid it is
    refused at set-up, before any step, nothing written."""
    from qft import layers
    from qft.export.gguf import load_gguf
    from qft.export.gguf.callback import GGUFExportCallback
    from qft.prilora import PRILoRACallback
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    module = _module(base, distill=qat != "solved")  # a solved grid refuses the self-teacher (test_combination)
    export = GGUFExportCallback(tmp_path / "model.gguf", quant="Q4_0", progress=False)
    cbs = [export, PRILoRACallback(r_start=2, r_end=6, final_sparsity=0.5, start_step=1, end_step=3, interval=1),
           QATCallback(weight=QuantScheme(bits=4, group_size=32), start_step=1, lora_merged=qat != "unmerged",
                       init={"method": "gptq", "n_samples": 4, "seq_len": 32} if qat == "solved" else "minmax")]
    trainer, data, counter, _ = _fit(tmp_path, module, cbs)
    if qat == "unmerged":
        with pytest.raises(ValueError, match="unmerged LoRA"):
            trainer.fit(module, datamodule=data)
        assert counter.steps == 0 and not export.output_dir.exists()
        return
    trainer.fit(module, datamodule=data)
    assert counter.steps == STEPS and export.tokens is None  # kept: nothing calibrated
    learned = layers.grids(module.model)
    back = dict(load_gguf(export.checkpoint_path).named_parameters())
    assert len(learned) == 28
    for name, qw in learned.items():
        assert torch.equal(back[name + ".weight"], qw.dequantize()), name
