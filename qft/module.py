"""``CausalLMModule``: the LightningModule every qft recipe trains.

Lifecycle
---------
- ``__init__``: validates every argument; builds nothing (so FSDP/meta-device init stays possible).
- ``configure_model`` (called by Lightning after ``setup``, before DDP/FSDP wrapping; also by
  ``load_from_checkpoint``): loads the base model, runs queued ``"base"`` hooks (PRILoRA plans ranks
  here), swaps base linears to NF4, attaches peft LoRA, enables gradient checkpointing, then runs
  ``"final"`` hooks (QAT swaps layers here), then ``"observe"`` hooks (PRILoRA's statistics, the
  export's checks). See ``qft.hooks``.
- ``training_step``/``validation_step``: ``step_loss`` (override point, e.g. distillation) under bf16
  autocast where the hardware supports it; logs loss, perplexity, tokens/s and the learning rate.
- ``on_save_checkpoint``: drops frozen base weights (and their NF4 state) so checkpoints hold only
  what training changes: adapters, trainable weights, and qft buffers (observers, masks); records
  every structural change (``qft.hooks.record_change``). Planned adapter ranks are hyper-parameters.
- ``on_load_checkpoint``: builds the model (with the recorded ranks), replays the recorded changes,
  so a checkpoint loads into a fresh module (``load_from_checkpoint``, ``qft export --ckpt``)
  without the callbacks that shaped it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from . import hooks, models, sharding
from .data.tokenize import IGNORE
from .qlora import QUANTIZATIONS

ADAPTERS = ("none", "lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls are native: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        import bitsandbytes.functional as bnbF

        return bool(bnbF.has_avx512bf16())
    except Exception:
        return False


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy, mean over labelled tokens, as HF computes it, but the LM head runs
    only at positions that predict a label. Instruction data labels only the response, so this skips
    most of the vocabulary projection (and its logits' memory) on prompt tokens."""
    labels = batch["labels"]
    target = labels[:, 1:]
    keep = (target != IGNORE).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError("causal_lm_loss: the batch has no labelled tokens (every label is -100).")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(),
                                             ignore_index=IGNORE)


def batch_tokens(batch: dict) -> int:
    """Tokens a batch trains on (padding excluded when there is an attention mask)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


QFT_ADAPTER_META = "qft_adapter.json"
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def adapter_state_dict(state_dict: dict, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``adapter`` as peft saves them: ``...q_proj.lora_A.weight`` (no adapter name).

    Selected by key, not by peft's layer classes: peft (0.21) finds adapter weights by visiting its own
    LoRA layers, and QAT's ``FakeQuantLoRALinear`` takes their place while keeping their keys, so
    ``PeftModel.save_pretrained`` of a QAT-trained model wrote an empty adapter.
    """
    out = {}
    for key, value in state_dict.items():
        for part in LORA_PARTS:
            tag = f".{part}.{adapter}"
            if tag in key:
                out[key.replace(tag, f".{part}", 1)] = value.detach().to("cpu").contiguous()
    return out


def save_adapter(peft_model, root, name: str = "adapter", meta: dict | None = None,
                 state_dict: dict | None = None) -> "Path":
    """Write peft adapters into ``root/name`` (or ``name-1``, ``name-2``... if taken) via a temp dir + rename.

    ``meta`` (what the adapters were trained on: base model, NF4 or not) goes beside them in
    ``qft_adapter.json``, so ``qft export --adapter`` can merge into the base they were trained on.
    ``state_dict``: the model's full state dict, where the model itself holds only shards (FSDP).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target, i = root / name, 0
    while target.exists():
        i += 1
        target = root / f"{name}-{i}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        from safetensors.torch import save_file

        adapter = peft_model.active_adapter
        tensors = adapter_state_dict(peft_model.state_dict() if state_dict is None else state_dict, adapter)
        if not tensors:
            raise ValueError(f"save_adapter: the model holds no LoRA weights of adapter {adapter!r}.")
        config = copy.deepcopy(peft_model.peft_config[adapter])
        config.inference_mode = True  # as peft saves it
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if meta:
            (tmp / QFT_ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"CausalLMModule({name}={value!r}) is not supported; allowed: {list(allowed)}.")


class CausalLMModule(pl.LightningModule):
    """Fine-tune a causal language model, optionally NF4-quantised with LoRA adapters (QLoRA).

    Args:
        model: a built-in name (``smollm2-135m``, ``tiny-llama``), a local path or a Hugging Face id.
        quantization: ``none``, ``nf4`` or ``nf4-dq`` (NF4 with double quantisation); the base becomes
            frozen bitsandbytes Linear4bit everywhere but ``lm_head``, so an adapter is required.
        compute_dtype: ``auto`` (bf16 where supported, else fp32), ``float32``, ``bfloat16`` or ``float16``:
            the NF4 compute dtype and the autocast dtype.
        adapter: ``none`` (full fine-tune) or ``lora`` (peft LoRA).
        lora_r, lora_alpha, lora_dropout: LoRA shape; per-module ranks may be planned by PRILoRA.
        target_modules: peft ``target_modules``: ``all-linear`` (every linear but the head) or a list.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warmup and a cosine decay to
            ``min_lr_ratio * lr`` over the trainer's stepping batches.
        seed: seed of the built-in random model (tiny-llama).
        rank_pattern, alpha_pattern: per-module LoRA ranks and alphas (peft's patterns). PRILoRA plans them
            and records them here, so a checkpoint rebuilds adapters of the trained shapes.
        save_adapter: at fit end (rank zero), also write the adapters in peft's format
            (``adapter_config.json`` + ``adapter_model.safetensors``) to ``<log_dir>/adapter``, a fresh
            ``adapter-N`` if that exists; ``self.adapter_dir`` tells where.
        attention: ``"sdpa"`` (default) or ``"eager"``, faster on the CPU for short sequences such as
            the demo's chats (2.4 s vs 2.9 s per step).
    """

    def __init__(self, model: str = "smollm2-135m", quantization: str = "none", compute_dtype: str = "auto",
                 adapter: str = "none", lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 target_modules: str | list[str] = "all-linear", gradient_checkpointing: bool = False,
                 lr: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 seed: int = 0, save_adapter: bool = True, rank_pattern: dict | None = None,
                 alpha_pattern: dict | None = None, attention: str = "sdpa"):
        super().__init__()
        models.check_name(model, f"CausalLMModule(model={model!r})")
        _check_choice("attention", attention, ("sdpa", "eager"))
        _check_choice("quantization", quantization, QUANTIZATIONS)
        _check_choice("compute_dtype", compute_dtype, ("auto", *DTYPES))
        _check_choice("adapter", adapter, ADAPTERS)
        if quantization != "none" and adapter == "none":
            raise ValueError(f"CausalLMModule(quantization={quantization!r}, adapter='none'): an NF4 base is frozen, "
                             "so nothing would train. Set adapter='lora' (QLoRA) or quantization='none'.")
        if not isinstance(lora_r, int) or lora_r < 1:
            raise ValueError(f"CausalLMModule(lora_r={lora_r!r}): the LoRA rank must be an integer >= 1.")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"CausalLMModule(lora_dropout={lora_dropout!r}): must be in [0, 1).")
        if lr <= 0:
            raise ValueError(f"CausalLMModule(lr={lr!r}): the learning rate must be > 0.")
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"CausalLMModule(warmup_steps={warmup_steps!r}, min_lr_ratio={min_lr_ratio!r}): "
                             "warmup_steps must be >= 0 and min_lr_ratio in [0, 1].")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [target_modules]
        self.save_hyperparameters()
        self.model_name = model
        self.model = None
        self.tokenizer = None
        self.model_ready = False
        self.qft_model_hooks = {p: [] for p in hooks.PHASES}
        self.qft_changes: list = []  # structural changes, replayed from checkpoints (qft.hooks)
        self.rank_pattern: dict[str, int] = dict(rank_pattern or {})
        self.alpha_pattern: dict[str, float] = dict(alpha_pattern or {})
        self.strict_loading = False  # checkpoints omit frozen base weights
        self._t_batch = None
        self.adapter_dir: str | None = None

    # ------------------------------------------------------------------ model
    @property
    def compute_dtype(self) -> torch.dtype:
        name = self.hparams.compute_dtype
        if name == "auto":
            return torch.bfloat16 if bf16_supported(self.device) else torch.float32
        return DTYPES[name]

    def setup(self, stage: str) -> None:
        sharding.check(self)  # before the model is built: FSDP with NF4 or whole-weight callbacks is refused

    def configure_model(self) -> None:
        if self.model_ready:
            return
        hp = self.hparams
        if hp.quantization != "none":  # built NF4 tensor by tensor: the fp32 model never exists
            self.model = models.load_nf4_model(hp.model, double_quant=hp.quantization == "nf4-dq",
                                               compute_dtype=self.compute_dtype, seed=hp.seed)
        else:
            self.model = models.load_model(hp.model, dtype=torch.float32, seed=hp.seed)
        if hp.get("attention", "sdpa") != "sdpa":
            # On the CPU, SDPA's flash backward costs ~0.5 s of a 2.9 s SmolLM2 step on 43-token chats;
            # eager attention does the same in plain matmuls (measured: 2.4 s per step).
            self.model.set_attn_implementation(hp.attention)
        self.tokenizer = models.load_tokenizer(hp.model)
        from qft import sparsity

        if sparsity.is_sparse(self.model):  # a pruned checkpoint: its zeros stay zeros (qft.sparsity)
            sparsity.protect_zeros(self.model)
        hooks.run_hooks(self, "base")
        # planned ranks are part of the module's configuration: checkpoints rebuild the same adapters
        self.hparams["rank_pattern"], self.hparams["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        if hp.adapter == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                                target_modules=hp.target_modules, rank_pattern=dict(self.rank_pattern),
                                alpha_pattern=dict(self.alpha_pattern), task_type="CAUSAL_LM")
            self.model = get_peft_model(self.model, config)
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model_ready = True
        hooks.run_hooks(self, "final")
        hooks.run_hooks(self, "observe")
        sharding.shard(self)  # under ModelParallelStrategy (FSDP2): after every structural change

    def forward(self, **batch):
        return self.model(**batch)

    def _autocast(self):
        dt = self.compute_dtype
        return torch.autocast(self.device.type, dtype=dt, enabled=dt != torch.float32)

    def step_loss(self, batch: dict, stage: str) -> torch.Tensor:
        """Loss of one batch; subclasses (distillation) override this, not the step methods."""
        return causal_lm_loss(self.model, batch)

    # --------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx):
        self._t_batch = time.perf_counter()

    def training_step(self, batch, batch_idx):
        with self._autocast():
            loss = self.step_loss(batch, "train")
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(loss.detach().float().clamp(max=20)), batch_size=bs)
        if self.trainer is not None and self.trainer.optimizers:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # after backward and the optimizer step, so the rate is that of whole training steps
        if self._t_batch is not None:
            self.log("train/tokens_per_s", batch_tokens(batch) / max(time.perf_counter() - self._t_batch, 1e-9),
                     prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, "test")

    def _eval_step(self, batch, stage):
        with self._autocast():
            loss = self.step_loss(batch, stage)
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss.detach().float().clamp(max=20)), batch_size=bs, sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups: dict[tuple, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # Parameters may ask for their own LR multiplier (QAT's learned scales do); those are
            # quantization ranges, not weights, so they never decay.
            lr_scale = getattr(p, "qft_lr_scale", None)
            decay = hp.weight_decay if p.ndim >= 2 and lr_scale is None else 0.0
            groups.setdefault((decay, float(lr_scale or 1.0)), []).append(p)
        if not groups:
            raise RuntimeError("CausalLMModule has no trainable parameters; check adapter/target_modules.")
        param_groups = [{"params": ps, "weight_decay": d, "lr": hp.lr * s} for (d, s), ps in groups.items()]
        opt = torch.optim.AdamW(param_groups, lr=hp.lr, betas=(0.9, 0.999))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1000
        warm, floor = hp.warmup_steps, hp.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if not (self.hparams.save_adapter and self.hparams.adapter == "lora"):
            return
        root = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank asks
        full = sharding.full_state_dict(self.model) if sharding.is_sharded(self.model) else None  # collective
        if self.trainer.is_global_zero:
            meta = {"model": self.hparams.model, "quantization": self.hparams.quantization}
            self.adapter_dir = str(save_adapter(self.model, root, meta=meta, state_dict=full))
        self.adapter_dir = self.trainer.strategy.broadcast(self.adapter_dir)

    # ------------------------------------------------------------ checkpoints
    def frozen_state_keys(self) -> set[str]:
        """State-dict keys of frozen base weights, including bitsandbytes' NF4 quant state."""
        # remove_duplicate=False: a tied weight (lm_head = embed_tokens) has a state-dict key per name
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        prefixes = tuple(n[: -len("weight")] + "weight." for n in frozen if n.endswith("weight"))
        return {k for k in self.state_dict() if k in frozen or (prefixes and k.startswith(prefixes))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop = self.frozen_state_keys()
        sd = checkpoint["state_dict"]
        for k in drop:
            sd.pop(k, None)
        cls = type(self)
        checkpoint["qft"] = {"frozen_keys_dropped": len(drop), "model": self.hparams.model,
                             "class_path": f"{cls.__module__}.{cls.__qualname__}",
                             "changes": [list(c) for c in self.qft_changes]}

    @staticmethod
    def load_any(path: str, allow_unsafe: bool = False, **kwargs) -> "CausalLMModule":
        """Load a qft checkpoint with the module class that saved it (e.g. a DistillationModule).

        The file is read by torch's weights-only unpickler (``qft.safe_load``); ``allow_unsafe=True`` is
        the explicit opt-in for a trusted checkpoint that needs full unpickling."""
        import importlib

        from .safe_load import load_checkpoint

        ckpt = load_checkpoint(path, allow_unsafe)
        class_path = ckpt.get("qft", {}).get("class_path", f"{__name__}.CausalLMModule")
        mod, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
        if not (isinstance(cls, type) and issubclass(cls, CausalLMModule)):
            raise TypeError(f"checkpoint {path!r} was saved by {class_path}, not a CausalLMModule.")
        return cls.load_from_checkpoint(path, weights_only=not allow_unsafe, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()  # adapter ranks come from the hyper-parameters (rank_pattern)
        # Layers swapped by callbacks (QAT) are swapped again first, so their state has somewhere to go.
        hooks.replay_changes(self, checkpoint.get("qft", {}).get("changes"))
        expected = set(self.state_dict()) - self.frozen_state_keys()
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; it was saved "
                           "from a differently configured module (adapter, ranks or QAT settings differ).")
