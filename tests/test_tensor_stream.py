"""qft.tensor_stream reads what safetensors writes, tensor by tensor, and names a broken file."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from qft.tensor_stream import TensorFiles


def test_reads_every_dtype_and_shape_as_safetensors_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2, generator=g).half(), "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "mask": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    files = TensorFiles(tmp_path)
    got = {name: files.read(name) for name in files.names()}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    got["a.weight"].add_(1)  # each tensor owns its memory
    assert not torch.equal(got["a.weight"], want["a.weight"])


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        TensorFiles(tmp_path).read("w")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TensorFiles(other)


def test_reading_into_another_dtype_converts_chunk_by_chunk(tmp_path, monkeypatch):
    from qft import tensor_stream

    monkeypatch.setattr(tensor_stream, "CHUNK", 64)  # bytes: many chunks for a 3 x 100 tensor
    w = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    save_file({"w": w, "ids": torch.arange(5)}, str(tmp_path / "m.safetensors"))
    files = TensorFiles(tmp_path)
    assert files.dtype("w") == torch.float32 and sorted(files.names()) == ["ids", "w"]
    got = files.read("w", torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 100) and torch.equal(got, w.to(torch.bfloat16))
    assert torch.equal(files.read("w"), w) and torch.equal(files.read("ids"), torch.arange(5))
    with pytest.raises(KeyError, match="holds no tensor 'nope'"):
        files.read("nope")

