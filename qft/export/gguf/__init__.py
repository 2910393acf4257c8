"""GGUF export for llama.cpp (and Ollama, LM Studio): llama.cpp's k-quant mixes, rounded with calibration data.

- ``config``: ``GGUFConfig`` (quant mix, rounding method), validated before any work;
- ``mix``: the per-tensor format llama.cpp's ``llama-quantize`` picks for each mix;
- ``writer``: llama.cpp's tensor names, hyper-parameters and tokenizer keys, an atomic write;
- ``export``: ``export_gguf``, the sequential calibration with a block grid per layer
  (``qft.quant.ggml``) and GPTQ inside it.
"""
from .config import METHODS, QUANTS, GGUFConfig
from .export import QAT_GRIDS, check_trained, export_gguf, export_trained, load_gguf

__all__ = ["GGUFConfig", "QUANTS", "METHODS", "QAT_GRIDS", "export_gguf", "export_trained", "check_trained",
           "load_gguf"]
