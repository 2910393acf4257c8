"""Post-training quantization of weights and activations (W8A8 int8), written as compressed-tensors.

``quantize_w8a8(model, W8A8Config(...), tokens)`` then ``save_w8a8(model, out, cfg)``; ``load_w8a8`` reads
the checkpoint back in pure torch. See ``qft.ptq.model`` for the lifecycle.
"""
from .config import W8A8Config
from .layer import W8A8Linear
from .model import quantize_w8a8

__all__ = ["W8A8Config", "W8A8Linear", "quantize_w8a8", "save_w8a8", "load_w8a8"]


def __getattr__(name):  # the checkpoint module needs compressed-tensors only when used
    if name in ("save_w8a8", "load_w8a8"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
