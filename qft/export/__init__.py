"""Post-fit export: merge adapters into the full-precision base, quantize with GPTQ, RTN or AWQ (pure
torch), optionally prune, and write a Hugging Face GPTQ or AWQ checkpoint that ``load_quantized`` (pure
torch) and transformers+gptqmodel read.

Pieces: ``config.GPTQConfig`` (knobs), ``gptq`` (the solve), ``awq`` (AWQ's scale and clip search, a
pre-pass of the driver), ``prune`` (magnitude/Wanda masks, SparseGPT's choice inside the solve),
``calibration`` (tokens), ``sequential`` (block-by-block driver), ``blocks`` (what a decoder block looks
like), ``merge`` (adapters -> fp base), ``checkpoint`` (atomic HF write), ``load``, ``report``,
``callback.GPTQExportCallback`` (Lightning) and ``cli`` (``qft export``). W8A8 lives in ``qft.ptq``;
``gguf`` writes llama.cpp files (its mixes, block grids from ``qft.quant.ggml``, GPTQ inside them).
"""
from .blocks import find_decoder_blocks
from .calibration import CalibrationError, calibration_mix, calibration_tokens
from .checkpoint import save_quantized
from .config import GPTQConfig
from .gptq import QuantizedWeight, gptq_solve, rtn_solve
from .load import load_quantized
from .sequential import quantize_model

__all__ = ["GPTQConfig", "GPTQExportCallback", "CalibrationError", "calibration_mix", "calibration_tokens",
           "save_quantized", "QuantizedWeight", "gptq_solve", "rtn_solve", "load_quantized", "find_decoder_blocks",
           "quantize_model"]


def __getattr__(name):  # lazy: the callback pulls in Lightning, the functions above do not
    if name == "GPTQExportCallback":
        from .callback import GPTQExportCallback

        return GPTQExportCallback
    raise AttributeError(f"module 'qft.export' has no attribute {name!r}")
