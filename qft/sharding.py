"""FSDP for qft modules: what shards, what is refused, and how adapters leave a sharded model.

qft shards with FSDP2 (``torch.distributed.fsdp.fully_shard``), the way Lightning's
``ModelParallelStrategy`` expects: the module applies it in ``configure_model`` once its model is
final (adapters attached, callbacks' layer swaps done), one unit per decoder layer plus the root.
FSDP2 runs on the CPU over gloo too, so the sharded fit is tested on this machine; Lightning's
``FSDPStrategy`` (FSDP1) needs CUDA and is not tested here.

Refused at set-up, before any weight is loaded, with the reason:
- NF4 bases (``quantization != "none"``): bitsandbytes' ``Params4bit`` packs a weight and keeps its
  quant state beside it, neither of which a flat FSDP shard can split. NF4 QLoRA replicates the small
  4-bit base under DDP instead (``strategy="ddp"``).
- callbacks that need whole weights (PRILoRA's masks on ``lora_A``, the GPTQ export at fit end, QAT's
  conversion at fit end and its learned scales, set from the whole weight in the first fake-quant forward,
  a write FSDP's gathered parameters do not keep): under FSDP a rank holds only its shard. Each callback
  says so itself, in a ``whole_weights`` attribute (the reason, or ``None``). Train sharded, then export
  from the checkpoint or the saved adapters. QAT with min-max scales trains sharded (test_fsdp.py).

Lifecycle: ``check(pl_module)`` in ``setup``; ``shard(pl_module)`` at the end of ``configure_model``;
``full_state_dict(model)`` (a collective: every rank calls it) when the adapters are saved.
"""
from __future__ import annotations

import torch


def strategy_kind(pl_module) -> str | None:
    """``"fsdp2"`` (ModelParallelStrategy), ``"fsdp"`` (FSDPStrategy) or ``None``."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None:
        return None
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    return None


def check(pl_module) -> None:
    """Refuse, before any work, a sharded fit that qft cannot run correctly."""
    kind = strategy_kind(pl_module)
    if kind is None:
        return
    strategy = type(pl_module.trainer.strategy).__name__
    quant = pl_module.hparams.quantization
    if quant != "none":
        raise ValueError(f"CausalLMModule(quantization={quant!r}) cannot be sharded by {strategy}: bitsandbytes' "
                         "packed 4-bit weights and their quant state do not split into FSDP shards. Use "
                         "strategy='ddp' for NF4 QLoRA (the 4-bit base is small enough to replicate), or "
                         "quantization='none' to shard a full-precision base.")
    for cb in pl_module.trainer.callbacks:
        why = getattr(cb, "whole_weights", None)
        if why:
            raise ValueError(f"{type(cb).__name__} cannot run under {strategy}: {why}, and each rank holds only a "
                             "shard. Train with strategy='ddp', or train sharded and then export from the "
                             "checkpoint or the saved adapters (qft export --ckpt/--adapter).")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a (peft-wrapped) causal LM: FSDP's units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no model.layers; qft shards decoder-layer by decoder-layer.")
    return list(layers)


def shard(pl_module) -> None:
    """``fully_shard`` each decoder layer, then the whole model, over the data-parallel mesh."""
    if strategy_kind(pl_module) != "fsdp2":
        return
    from torch.distributed.fsdp import fully_shard

    mesh = pl_module.device_mesh["data_parallel"]
    for layer in decoder_layers(pl_module.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(pl_module.model, mesh=mesh)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (a collective: every rank must call it; all get it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
