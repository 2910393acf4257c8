"""qft: quantization-aware fine-tuning of language models for PyTorch Lightning."""
__version__ = "0.1.0"

from .quant import GPTQLinear, QuantScheme  # noqa: E402

__all__ = ["__version__", "QuantScheme", "GPTQLinear", "load_quantized", "CausalLMModule", "QFTDataModule"]


def __getattr__(name):  # lazy: `import qft` stays light; Lightning/transformers load on first use
    if name == "load_quantized":
        from .export import load_quantized

        return load_quantized
    if name == "CausalLMModule":
        from .module import CausalLMModule

        return CausalLMModule
    if name == "QFTDataModule":
        from .data import QFTDataModule

        return QFTDataModule
    raise AttributeError(f"module 'qft' has no attribute {name!r}")
