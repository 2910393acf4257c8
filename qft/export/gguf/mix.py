"""Which block format each tensor of a GGUF file gets: llama.cpp's choice for Llama models.

A quantization name like ``Q4_K_M`` is a mix, not one format. llama.cpp (``llama_tensor_get_type`` in
``src/llama-quant.cpp``, read at llama-cpp-python 0.3.36) decides per tensor; for the Llama
architecture and the mixes qft writes that is:

- norms and other 1-D tensors stay F32;
- the output matrix, or the token embedding when the two are tied, gets Q6_K (Q8_0 for the Q8_0 mix,
  and Q8_0 whenever its rows do not fill whole blocks of the mix's format);
- ``_M`` mixes give Q6_K to ``attn_v`` and ``ffn_down`` of the layers where ``use_more_bits`` holds:
  the first and last eighth of the layers and every third one between;
- a k-quant whose 256-weight super-block does not divide a row falls back to a 32-weight format
  (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0): SmolLM2's 576-wide rows take this road, so most of its
  "Q4_K_M" is Q5_0.

qft writes the same mix, so a qft file and a llama.cpp file of one model have the same size and
differ only in how each block was rounded.
"""
from __future__ import annotations

from qft.quant.ggml import FORMATS

MIXES = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
         "F16": "F16", "F32": "F32"}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
FLOAT = ("F16", "F32")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def block_of(fmt: str) -> int:
    return 1 if fmt in FLOAT else FORMATS[fmt].super_block


def tensor_types(quant: str, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """``{gguf tensor name: format}`` for ``tensors`` (name and shape as ``[rows, row length]``, in
    file order: the per-layer counters follow it, as llama.cpp's do)."""
    if quant not in MIXES:
        raise ValueError(f"tensor_types(quant={quant!r}) is unknown; allowed: {list(MIXES)}.")
    default = MIXES[quant]
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_v = sum(n.endswith("attn_v.weight") for n in names)
    n_down = sum(n.endswith("ffn_down.weight") for n in names)
    i_v = i_down = 0
    out = {}
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
            out[name] = "F32"
            continue
        t = default
        row = shape[-1]
        if default in FLOAT:
            out[name] = default
            continue
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            t = "Q8_0" if row % block_of(default) or default == "Q8_0" else "Q6_K"
        elif name.endswith("attn_v.weight"):
            if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_v, n_v):
                t = "Q6_K"
            i_v += 1
        elif name.endswith("ffn_down.weight"):
            if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_down, n_down):
                t = "Q6_K"
            i_down += 1
        if row % block_of(t):
            t = FALLBACK.get(t, t)
            if row % block_of(t):
                t = "F16"
        out[name] = t
    return out
