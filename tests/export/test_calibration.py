"""Calibration sources and the errors raised before any model work."""
import pytest
import torch

from qft.export import CalibrationError, calibration_tokens


def test_text_file_gives_evenly_spaced_windows(tmp_path, tokenizer, calib_text):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(calib_text))
    t = calibration_tokens(str(f), tokenizer, n_samples=6, seq_len=32)
    assert t.shape == (6, 32) and t.dtype == torch.long
    stream = torch.tensor(tokenizer(f.read_text(), add_special_tokens=False)["input_ids"])
    assert torch.equal(t[0], stream[:32])  # windows are slices of the file's token stream
    assert len({tuple(r.tolist()) for r in t}) == 6


def test_list_of_strings_and_cap_at_model_length(tokenizer, calib_text):
    t = calibration_tokens(calib_text, tokenizer, n_samples=4, seq_len=2048, max_length=48)
    assert t.shape == (4, 48)


def test_token_tensor_is_used_as_is():
    x = torch.randint(0, 100, (3, 20))
    assert torch.equal(calibration_tokens(x, n_samples=3, seq_len=20), x)


class _DM:
    """Minimal DataModule: padded batches; padding must not reach calibration."""

    def setup(self, stage):
        self.ready = True

    def train_dataloader(self):
        for k in range(4):
            ids = torch.arange(k * 100, k * 100 + 40).reshape(2, 20)
            mask = torch.ones_like(ids)
            mask[:, 15:] = 0
            yield {"input_ids": ids, "attention_mask": mask}


def test_datamodule_drops_padding():
    t = calibration_tokens(_DM(), n_samples=2, seq_len=30)
    assert t.shape == (2, 30)
    assert torch.equal(t[0, :15], torch.arange(0, 15)) and torch.equal(t[0, 15:30], torch.arange(20, 35))


@pytest.mark.parametrize("source,match", [(None, "needs calibration data"), ("/no/such/file.txt", "no such file"),
                                          ([], "non-empty strings"), (["ok", ""], "non-empty strings"),
                                          (3.5, "not supported")])
def test_missing_or_bad_data(source, match, tokenizer):
    with pytest.raises(CalibrationError, match=match):
        calibration_tokens(source, tokenizer, n_samples=2, seq_len=8)


def test_too_few_tokens_says_how_many(tokenizer):
    with pytest.raises(CalibrationError, match=r"too few tokens: \d+ available, 128 x 2048"):
        calibration_tokens(["a short text"], tokenizer)


def test_empty_file(tmp_path, tokenizer):
    f = tmp_path / "e.txt"
    f.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        calibration_tokens(str(f), tokenizer, n_samples=1, seq_len=8)


def test_calibration_mix_takes_its_share_of_general_text(tokenizer):
    from qft.export import calibration_mix

    task = torch.arange(1000, 5000)  # a token stream
    general = torch.arange(20000, 30000).reshape(10, 1000)  # 2-D: read as a stream, cut to seq_len
    mix = calibration_mix(task, general, tokenizer, n_samples=8, seq_len=32, general_fraction=0.25)
    assert mix.shape == (8, 32)
    from_general = (mix >= 20000).all(1)
    assert from_general.sum() == 2 and not from_general[:6].any()  # task windows first, then general
    assert torch.equal(calibration_mix(task, None, tokenizer, 8, 32), calibration_mix(task, general, tokenizer, 8, 32,
                                                                                       general_fraction=0.0))
    with pytest.raises(ValueError, match="general_fraction=1.5"):
        calibration_mix(task, general, tokenizer, 8, 32, general_fraction=1.5)
