"""PRILoRA: LoRA ranks that increase linearly with depth, plus importance-based pruning of A.

Benedek & Wolf, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation", Findings of EACL 2024
(arXiv 2401.11316). ``PRILoRACallback`` plugs into any qft ``CausalLMModule``; ``build_patterns``
gives the peft ``rank_pattern``/``alpha_pattern`` for users of plain peft.
"""
from .callback import PRILoRACallback, check_target_modules
from .config import PRILoRAConfig
from .math import alpha_schedule, build_patterns, importance, is_pruning_step, rank_schedule, sparsity_at, update_mask

__all__ = ["PRILoRACallback", "PRILoRAConfig", "build_patterns", "rank_schedule", "alpha_schedule", "importance",
           "sparsity_at", "is_pruning_step", "update_mask", "check_target_modules"]
