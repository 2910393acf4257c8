"""Read a safetensors file one tensor at a time with plain file reads.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor read touches counts
in the process's resident set until the mapping goes, which is when the last tensor read from it is
freed (a 576-float norm weight is enough to keep a whole 540 MB file mapped). Building SmolLM2's NF4
base through ``safe_open`` peaked at 1288 MB RSS against 969 MB for loading the whole fp32 model;
reading each tensor into its own buffer keeps only the tensor being placed (BENCHMARKS.md, memory).
The format is the documented one: an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _header(f, path) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a safetensors file (unreadable header: {e}).") from None
    header.pop("__metadata__", None)
    return header, 8 + n


CHUNK = 16 << 20  # bytes read at a time when a tensor is converted on the way in


def _read(f, path, base: int, name: str, info: dict, to: torch.dtype | None = None) -> torch.Tensor:
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{str(path)!r}: tensor {name!r} has dtype {info['dtype']!r}, which qft does not read "
                         f"(allowed: {sorted(DTYPES)}).")
    start, end = info["data_offsets"]
    f.seek(base + start)
    if to is not None and to != dtype and end > start:
        # converted chunk by chunk into its final dtype: a 113 MB fp32 embedding never exists beside its bf16 copy
        out = torch.empty(info["shape"], dtype=to).view(-1)
        step = max(1, CHUNK // dtype.itemsize)
        buf = bytearray(min(end - start, step * dtype.itemsize))
        for i in range(0, out.numel(), step):
            n = min(step, out.numel() - i)
            view = memoryview(buf)[: n * dtype.itemsize]
            if f.readinto(view) != len(view):
                raise ValueError(f"{str(path)!r} is truncated (tensor {name!r}).")
            out[i: i + n].copy_(torch.frombuffer(view, dtype=dtype))
        return out.view(info["shape"])
    buf = bytearray(end - start)
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{str(path)!r} is truncated (tensor {name!r}).")
    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
    return t.reshape(info["shape"]) if to is None else t.reshape(info["shape"]).to(to)


def _check_order() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("tensor_stream reads little-endian safetensors data on little-endian machines only.")


def place(root: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``name`` of ``root`` (frozen)."""
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(f"the checkpoint holds {name!r}, which the model has no place for.")


class TensorFiles:
    """The tensors of a model directory's ``*.safetensors`` files, read by name when asked for."""

    def __init__(self, directory):
        _check_order()
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{str(self.directory)!r}: no *.safetensors file (a saved Hugging Face model "
                                    "directory is expected).")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            with open(file, "rb") as f:
                header, base = _header(f, file)
            for name, info in header.items():
                self.where[name] = (file, base, info)

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` (in ``dtype`` if given, converted chunk by chunk as it is read)."""
        if name not in self.where:
            raise KeyError(f"{str(self.directory)!r} holds no tensor {name!r}.")
        file, base, info = self.where[name]
        with open(file, "rb") as f:
            return _read(f, file, base, name, info, dtype)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.where[name][2]["dtype"]]
