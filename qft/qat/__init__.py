"""Quantization-aware training: fake-quant on the export grid, then convert to packed integers.

- ``QATCallback`` (callback.py): the Lightning entry point.
- ``QATConfig`` (config.py): validated settings; ``check_model`` validates against a model up front.
- ``prepare``/``convert`` (prepare.py, convert.py): the functional swap and the irreversible conversion.
- ``restore`` (restore.py): load a QAT checkpoint into a fresh module.
- ``GridSolve`` (solve.py): a grid solved by GPTQ at QAT start and then fixed (``QATConfig.init``).
- fake_quant.py / observer.py / layer.py: STE and LSQ math, activation observers, fake-quant layers.
"""
from .callback import QATCallback
from .config import QATConfig
from .convert import ActQuantGPTQLinear, convert
from .layer import FakeQuantLinear, FakeQuantLoRALinear
from .observer import ActivationFakeQuant
from .prepare import fake_quant_modules, prepare, set_state
from .restore import checkpoint_config, prepare_from_checkpoint, restore
from .solve import GridSolve

__all__ = ["QATCallback", "QATConfig", "FakeQuantLinear", "FakeQuantLoRALinear", "ActivationFakeQuant",
           "ActQuantGPTQLinear", "prepare", "convert", "set_state", "fake_quant_modules", "restore",
           "prepare_from_checkpoint", "checkpoint_config", "GridSolve"]
