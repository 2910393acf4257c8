"""GPTQExportCallback in a real Trainer.fit, and its checks before training."""
import json

import pytest
import pytorch_lightning as pl
import torch

from qft.export import load_quantized
from qft.export.callback import GPTQExportCallback


def trainer(tmp_path, cb, steps=2):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)


def test_fit_then_export_nf4_lora(tmp_path, calib_text):
    from qft.data import QFTDataModule
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", quantization="nf4", adapter="lora", lora_r=4, lr=1e-2,
                            compute_dtype="float32")
    dm = QFTDataModule(task="synthetic", seq_len=128, batch_size=4, num_train=16, num_val=4)
    cb = GPTQExportCallback(tmp_path / "int4", bits=4, group_size=64, calibration=calib_text, n_samples=8,
                            seq_len=64, dtype="float32", progress=False, merge_into="original",
                            calibration_offload="disk")  # same result wherever the activations wait
    trainer(tmp_path, cb).fit(module, datamodule=dm)
    out = tmp_path / "int4"
    assert cb.checkpoint_path == str(out.resolve()) and (out / "model.safetensors").exists()
    summary = json.loads((out / "qft_export.json").read_text())
    assert summary["merge_into"] == "original" and summary["merged_layers"] == 28
    assert summary["drift"]["max_logit_diff"] > 0  # measured against the trained NF4 model
    lq = load_quantized(out, dtype=torch.float32)
    x = cb.tokens[:1, :16]
    with torch.no_grad():
        ref = module.model(input_ids=x).logits
        got = lq(x).logits
    # int4 of the merged model stays close to the trained QLoRA model's predictions
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.9
    assert cb.state_dict()["checkpoint_path"] == cb.checkpoint_path


def test_missing_calibration_fails_before_training(tmp_path):
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", adapter="lora", lora_r=2)
    cb = GPTQExportCallback(tmp_path / "o", calibration=None)
    steps = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *a):
            steps.append(1)

    data = torch.utils.data.DataLoader([{"input_ids": torch.ones(8, dtype=torch.long),
                                         "labels": torch.ones(8, dtype=torch.long)}] * 2, batch_size=2)
    t = trainer(tmp_path, cb)
    t.callbacks.append(Spy())
    with pytest.raises(ValueError, match="calibration=None"):
        t.fit(module, train_dataloaders=data)
    assert steps == []


def test_too_few_tokens_fails_before_training(tmp_path):
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", adapter="lora", lora_r=2)
    cb = GPTQExportCallback(tmp_path / "o", calibration=["just a few words"], n_samples=4, seq_len=64)
    data = torch.utils.data.DataLoader([{"input_ids": torch.ones(8, dtype=torch.long),
                                         "labels": torch.ones(8, dtype=torch.long)}] * 2, batch_size=2)
    with pytest.raises(ValueError, match="too few tokens"):
        trainer(tmp_path, cb).fit(module, train_dataloaders=data)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw,match", [(dict(bits=5), "bits=5"), (dict(backend="vllm"), "backend='vllm'"),
                                      (dict(merge_into="fp8"), "merge_into='fp8'"), (dict(n_samples=0), "n_samples=0"),
                                      (dict(dtype="int8"), "dtype='int8'"),
                                      (dict(calibration_offload="gpu"), r"calibration_offload\): 'gpu' is not one of"),
                                      (dict(calibration_offload="disk", backend="gptqmodel"), "not to backend"),
                                      (dict(reuse_outputs="no"), "reuse_outputs='no'")])
def test_bad_arguments_fail_at_construction(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        GPTQExportCallback(tmp_path / "o", **kw)


def test_existing_output_dir_fails_at_construction(tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        GPTQExportCallback(tmp_path / "o")
    GPTQExportCallback(tmp_path / "o", overwrite=True)
