"""``qft export`` from a peft adapter directory and from a qft Lightning checkpoint."""
import argparse

import pytest
import pytorch_lightning as pl
import torch

from qft.export import cli, load_quantized


@pytest.fixture()
def calib_file(tmp_path, calib_text):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(calib_text))
    return f


def test_add_arguments_and_validation(tmp_path, calib_file):
    p = cli.add_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--adapter", "x", "--output", str(tmp_path), "--calibration", str(calib_file)])
    # grid defaults are None: they follow a QAT-trained grid, else GPTQConfig's (4, 128, symmetric)
    assert a.bits is None and a.group_size is None and a.asym is None
    assert a.qat_grid is None and a.general_target is None  # the measured road (pipeline.road)
    assert a.backend == "qft" and a.merge_into == "trained"
    with pytest.raises(FileExistsError, match="overwrite"):  # before any model is loaded
        cli.run(a)
    with pytest.raises(SystemExit):
        p.parse_args(["--adapter", "x", "--output", "o", "--calibration", "c", "--bits", "5"])


def test_export_from_adapter_dir(tmp_path, calib_file):
    from peft import LoraConfig, get_peft_model

    from qft.models import load_model

    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    summary = cli.main(["--adapter", str(tmp_path / "adapter"), "--model", "tiny-llama", "--output",
                        str(tmp_path / "q"), "--calibration", str(calib_file), "--n-samples", "8", "--seq-len", "64",
                        "--group-size", "64", "--dtype", "float32"])
    assert summary["merged_layers"] == 28
    assert summary["drift"]["max_logit_diff"] < 1e-3  # an fp32 base: the merge itself changes nothing
    assert load_quantized(tmp_path / "q").model.layers[0].self_attn.q_proj.bits == 4


def test_export_from_lightning_ckpt(tmp_path, calib_file):
    from qft.data import QFTDataModule
    from qft.module import CausalLMModule

    module = CausalLMModule(model="tiny-llama", adapter="lora", lora_r=4, lr=1e-2, compute_dtype="float32")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0,
                         enable_checkpointing=False)
    trainer.fit(module, datamodule=QFTDataModule(task="synthetic", seq_len=128, batch_size=2, num_train=4, num_val=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    summary = cli.main(["--ckpt", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "q"), "--calibration",
                        str(calib_file), "--n-samples", "8", "--seq-len", "64", "--group-size", "64",
                        "--method", "rtn", "--dtype", "float32"])
    assert summary["merged_layers"] == 28 and summary["config"]["method"] == "rtn"
    # the rebuilt module carried the trained adapters: the merge matches it
    assert summary["drift"]["max_logit_diff"] < 1e-3
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(load_quantized(tmp_path / "q")(x).logits).all()
