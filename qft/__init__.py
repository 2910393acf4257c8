"""qft: quantization-aware fine-tuning of language models for PyTorch Lightning."""
__version__ = "0.1.0"

from .quant import GPTQLinear, QuantScheme  # noqa: E402

__all__ = ["__version__", "QuantScheme", "GPTQLinear"]
