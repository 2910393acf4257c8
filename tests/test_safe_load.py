"""qft.safe_load: checkpoints are read without running code from them, and bad files get a message."""
import os

import pytest
import torch

from qft.safe_load import CheckpointError, load_checkpoint


class Payload:
    """Unpickling it writes a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(marker):
    with open(marker, "w") as f:
        f.write("ran")
    return marker


def test_plain_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"model": "tiny-llama"}}, path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2)) and ckpt["hyper_parameters"]["model"] == "tiny-llama"


def test_code_in_a_checkpoint_is_refused_unless_opted_in(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*arbitrary code.*allow_unsafe=True"):
        load_checkpoint(path)
    assert not marker.exists()
    assert load_checkpoint(path, allow_unsafe=True)["extra"] == str(marker) and marker.exists()


def test_load_any_refuses_it_too(tmp_path):
    from qft.module import CausalLMModule

    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "qft": {"class_path": Payload(str(marker))}}, path)
    with pytest.raises(CheckpointError, match="--allow-unsafe-load"):
        CausalLMModule.load_any(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [(b"hello, not a checkpoint\n", "could not be read"),
                                           (None, "could not be read")])
def test_truncated_or_foreign_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.ckpt"
    if content is None:  # a real checkpoint cut in half
        torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.ckpt.*{match}"):
        load_checkpoint(path)


def test_missing_file_and_non_lightning_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")


def test_no_code_path_unpickles_without_opt_in():
    """Every ``weights_only=False`` in qft sits behind ``allow_unsafe`` (the one fallback in safe_load)."""
    import qft

    root = os.path.dirname(qft.__file__)
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                hits += [f] * text.count("weights_only=False")
    assert hits == ["safe_load.py"]
