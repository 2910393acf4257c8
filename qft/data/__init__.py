"""Data for qft: local text, instruction files, and the built-in synthetic addition task."""
from .datamodule import TASKS, QFTDataModule
from .synthetic import addition_splits

__all__ = ["QFTDataModule", "TASKS", "addition_splits"]
