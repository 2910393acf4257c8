"""``PRILoRACallback``: linearly increasing LoRA ranks plus importance-based pruning of ``A``.

The math lives in :mod:`qft.prilora.math`; this file only decides *when* it runs and where the
state lives. See the class docstring for the lifecycle.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, Optional

import pytorch_lightning as pl
import torch

from .. import hooks, layers
from . import math as pm
from .config import PRILoRAConfig


def _hparam(pl_module, name, default=None):
    hp = getattr(pl_module, "hparams", None) or {}
    if name in hp:
        return hp[name]
    return getattr(pl_module, name, default)


def _in_backward() -> bool:
    # Non-reentrant gradient checkpointing re-runs forwards during backward; those must not count twice.
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def check_target_modules(model: torch.nn.Module, target_modules) -> None:
    """Fail before training when a ``target_modules`` entry matches no module of the base ``model``.

    Uses peft's rules: a string other than ``all-linear`` is a regex that must fully match a module name;
    a list entry matches a module whose name equals it or ends with ``.<entry>``.
    """
    names = [n for n, _ in model.named_modules() if n]
    if target_modules is None or target_modules == "all-linear":
        if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
            raise ValueError("target_modules='all-linear' matches nothing: the base model has no nn.Linear.")
        return
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in names):
            raise ValueError(f"target_modules={target_modules!r} (a regex) matches no module of the base model. "
                             f"Linear layer names include {leaves}. "
                             "Hint: use a list of names, e.g. ['q_proj', 'v_proj'].")
        return
    bad = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if bad:
        raise ValueError(f"target_modules={list(target_modules)!r}: {bad} match no module of the base model "
                         f"(peft would silently skip them). Allowed names include {leaves} or 'all-linear'.")


class PRILoRACallback(pl.Callback):
    """PRILoRA (Benedek & Wolf, Findings of EACL 2024, arXiv 2401.11316) as a Lightning callback.

    Args: a :class:`PRILoRAConfig` (``config=``) or its fields as keyword arguments; see that class for
    every knob and its default (the paper's exact schedule is not in our sources; defaults are ours).

    Lifecycle
    ---------
    - ``__init__``: validates the config (bad ranks, sparsity, interval or steps fail here).
    - ``setup``: registers two model hooks through :func:`qft.hooks.when_model_ready`:

      * ``"base"`` (base model built, no adapters yet): checks ``target_modules`` against the base model,
        counts the decoder layers and sets ``pl_module.rank_pattern`` / ``alpha_pattern`` (one regex key per
        layer) for the module's ``get_peft_model``. If the model already carries LoRA layers (plain peft
        users who built the patterns with :func:`qft.prilora.math.build_patterns`), it only plans.
      * ``"observe"`` (model complete, every layer swap done): finds every layer that applies a LoRA adapter
        (``qft.layers``: peft's LoRA layers, or QAT's merged-LoRA layers that replaced them), raises if any did
        not get its planned rank/alpha (peft silently ignores pattern keys that match nothing) or if there are
        none, then registers a forward pre-hook on each such layer (input EMA: the layer's input is what its
        ``lora_A`` multiplies, whether or not A runs on its own) and a gradient hook on each ``lora_A.weight``
        (multiplies the gradient by the mask). ``on_fit_start`` looks again, in case a callback set up after
        this one swapped the layers of a model that was built before ``fit``.
    - ``on_fit_start``: resolves ``start_step``/``end_step`` (None = 10% / 80% of the run).
    - every training forward up to ``end_step``: the pre-hook updates
      ``ema_j <- beta*ema_j + (1-beta)*mean_tokens(x_j^2)``, only when the module is in training mode with grad
      enabled (not in validation, not in checkpoint recompute). After ``end_step`` no mask changes, so it stops.
    - backward: pruned entries get zero gradient (tensor hook), so DDP all-reduces masked gradients.
    - ``on_train_batch_end`` (after the optimizer step, before the next forward): re-applies every mask to
      ``A`` (Adam's momentum would otherwise revive pruned entries), then, if ``trainer.global_step`` is a
      pruning step, averages the EMAs over DDP ranks (all-reduce) and updates each row's mask from
      ``|A|*sqrt(ema)``. It logs per-layer rank and A-sparsity there.
    - ``state_dict``/``load_state_dict``: masks, EMAs, counts, step counters and the plan travel in the
      checkpoint's callback state and are restored before training resumes (``on_train_start`` re-applies
      masks).
    - ``on_fit_end``: rank 0 writes ``prilora_layers.png`` next to the checkpoints.

    Masks and EMAs are held by the callback (moved to the adapter's device), not registered as module
    buffers: DDP broadcasts module buffers from rank 0 at every forward, which would overwrite each rank's
    local EMA and hide a rank that computed a different mask; keeping them out of the model also keeps
    peft's adapter export clean. They are checkpointed through the callback state instead.
    """

    PLOT_NAME = "prilora_layers.png"

    # qft.sharding: refused under FSDP, where a rank holds only shards of lora_A
    whole_weights = "it prunes whole lora_A matrices between steps by their importance"

    def __init__(self, config: Optional[PRILoRAConfig] = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError(f"PRILoRACallback(config=..., {', '.join(kwargs)}=...): give either a PRILoRAConfig or "
                             "its fields as keyword arguments, not both.")
        if config is not None and not isinstance(config, PRILoRAConfig):
            raise TypeError(f"PRILoRACallback(config={config!r}): expected a PRILoRAConfig.")
        self.config = config if config is not None else PRILoRAConfig(**kwargs)
        self.plan: Optional[dict] = None  # layers_prefix, ranks, alphas
        self.start_step: Optional[int] = None
        self.end_step: Optional[int] = None
        self.last_pruned_step = -1
        self.target_sparsity = 0.0
        self.masks: Dict[str, torch.Tensor] = {}
        self.emas: Dict[str, torch.Tensor] = {}
        self.ema_counts: Dict[str, int] = {}
        self.shadow: Dict[str, torch.Tensor] = {}  # regrow only: values of pruned entries
        self.plot_path = None
        self._lora: Dict[str, torch.nn.Linear] = {}  # module name -> lora_A linear
        self._outer: Dict[str, torch.nn.Module] = {}  # module name -> the layer applying the adapter
        self._layer_of: Dict[str, Optional[int]] = {}
        self._handles = []
        self._pending_state: Optional[dict] = None
        self._registered = None
        self._collecting = True  # EMA updates stop after end_step: no pruning decision needs them then

    # ------------------------------------------------------------------ model hooks
    def setup(self, trainer, pl_module, stage):
        if self._registered is pl_module:  # setup runs per stage (fit, validate...); plan a module once
            return
        self._registered = pl_module
        hooks.when_model_ready(pl_module, self._plan, phase="base")
        hooks.when_model_ready(pl_module, self._attach, phase="observe")

    def _plan(self, pl_module) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise RuntimeError("PRILoRACallback needs `pl_module.model` (the HF model) "
                               "to exist when the model is ready.")
        already_adapted = bool(layers.adapter_holders(model))
        base = model.get_base_model() if already_adapted and hasattr(model, "get_base_model") else model
        if not already_adapted:
            check_target_modules(base, _hparam(pl_module, "target_modules", None))
        prefix, n_layers = pm.find_decoder_layers(base)
        cfg = self.config
        alpha = cfg.alpha if cfg.alpha is not None else float(_hparam(pl_module, "lora_alpha", 16.0) or 16.0)
        r_ref = cfg.r_ref if cfg.r_ref is not None else float(_hparam(pl_module, "lora_r", 8) or 8)
        ranks = pm.rank_schedule(n_layers, cfg.r_start, cfg.r_end)
        alphas = pm.alpha_schedule(ranks, cfg.alpha_policy, alpha, r_ref)
        # A model adapted before the callback saw it (plain peft) carries its own alphas: check them only when
        # the user gave PRILoRA an explicit alpha.
        plan = {"layers_prefix": prefix, "ranks": ranks, "alphas": alphas,
                "check_alpha": not already_adapted or cfg.alpha is not None}
        if self.plan is not None and (self.plan["ranks"] != ranks or self.plan["layers_prefix"] != prefix):
            raise ValueError(f"PRILoRA: the checkpoint planned ranks {self.plan['ranks']} but this run plans {ranks}; "
                             "resume with the same r_start/r_end and model.")
        self.plan = plan
        if not already_adapted:
            rank_pattern, alpha_pattern = pm.build_patterns(n_layers, cfg.r_start, cfg.r_end, cfg.alpha_policy,
                                                            alpha, r_ref, layers_prefix=prefix)
            pl_module.rank_pattern = {**(getattr(pl_module, "rank_pattern", None) or {}), **rank_pattern}
            pl_module.alpha_pattern = {**(getattr(pl_module, "alpha_pattern", None) or {}), **alpha_pattern}

    def _adapted_layers(self, pl_module) -> dict:
        name = self.config.adapter_name
        return {n: m for n, m in layers.linear_layers(pl_module.model).items()
                if name in (getattr(m, "lora_A", None) or {})}

    def _attach(self, pl_module) -> None:
        if self.plan is None:
            self._plan(pl_module)
        name = self.config.adapter_name
        prefix, ranks, alphas = self.plan["layers_prefix"], self.plan["ranks"], self.plan["alphas"]
        found, wrong, outside, outer = {}, [], [], {}
        for mod_name, m in self._adapted_layers(pl_module).items():
            idx = pm.layer_index(mod_name, prefix)
            if idx is None:
                outside.append(mod_name)
            elif m.r[name] != ranks[idx] or (self.plan.get("check_alpha", True) and
                                             abs(float(m.lora_alpha[name]) - alphas[idx])
                                             > 1e-6 * max(1.0, alphas[idx])):
                wrong.append(f"{mod_name}: r={m.r[name]}, alpha={m.lora_alpha[name]} (planned r={ranks[idx]}, "
                             f"alpha={alphas[idx]:g})")
            found[mod_name] = m.lora_A[name]
            outer[mod_name] = m
            self._layer_of[mod_name] = idx
        if not found:
            raise RuntimeError(f"PRILoRA found no LoRA layer of adapter {name!r} in the model. Hint: use "
                               "CausalLMModule(adapter='lora') or wrap the model with peft.get_peft_model first.")
        if wrong:
            raise RuntimeError(f"PRILoRA: {len(wrong)} LoRA modules did not get their planned rank; peft silently "
                               f"ignores rank_pattern keys that match nothing. First ones: {wrong[:4]}. Hint: pass "
                               "qft.prilora.math.build_patterns(...) as LoraConfig(rank_pattern=, alpha_pattern=).")
        if outside:
            warnings.warn(f"PRILoRA: {len(outside)} LoRA modules lie outside the decoder layers ({outside[:3]}); they "
                          "keep the module's default rank but are pruned like the others.", RuntimeWarning)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._lora, self._outer = found, outer
        for mod_name, lin in found.items():
            self._handles.append(outer[mod_name].register_forward_pre_hook(self._make_observer(mod_name)))
            self._handles.append(lin.weight.register_hook(self._make_grad_mask(mod_name)))
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _make_observer(self, mod_name):
        def observe(module, args):
            if not (self._collecting and module.training and torch.is_grad_enabled()) or _in_backward() or not args:
                return
            x = args[0].detach()
            stat = x.float().pow(2).reshape(-1, x.shape[-1]).mean(0)
            first = self.ema_counts.get(mod_name, 0) == 0
            prev = self.emas.get(mod_name)
            self.emas[mod_name] = pm.ema_update(prev if prev is not None else stat, stat, self.config.ema_beta, first)
            self.ema_counts[mod_name] = self.ema_counts.get(mod_name, 0) + 1
        return observe

    def _make_grad_mask(self, mod_name):
        def mask_grad(grad):
            mask = self.masks.get(mod_name)
            return grad if mask is None else grad * mask.to(grad.dtype)
        return mask_grad

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer, pl_module):
        if self._lora and any(self._outer.get(n) is not m for n, m in self._adapted_layers(pl_module).items()):
            self._attach(pl_module)  # another callback swapped the adapted layers after we attached
        if self.start_step is None or self.end_step is None:
            self.start_step, self.end_step = self.config.resolve_steps(trainer.estimated_stepping_batches)

    def on_train_start(self, trainer, pl_module):
        self._collecting = trainer.global_step < self.end_step
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned entries of every ``A`` (idempotent)."""
        for mod_name, mask in self.masks.items():
            w = self._lora[mod_name].weight
            if mask.device != w.device:
                self.masks[mod_name] = mask = mask.to(w.device)
            w.mul_(mask.to(w.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.apply_masks()
        step = trainer.global_step
        if step > self.last_pruned_step and pm.is_pruning_step(step, self.start_step, self.end_step,
                                                               self.config.interval):
            self.prune(step)
            if self.config.log:
                pl_module.log_dict(self.metrics(), on_step=True, on_epoch=False, logger=True, rank_zero_only=True)
        self._collecting = step < self.end_step

    def _all_reduce_emas(self) -> None:
        """Average the EMAs over DDP ranks so every rank scores (and masks) identically."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        names = sorted(self._lora)
        widths = [self._lora[n].weight.shape[1] for n in names]
        device = self._lora[names[0]].weight.device
        flat = torch.zeros(sum(widths) + len(names), dtype=torch.float32, device=device)
        off = 0
        for i, (n, w) in enumerate(zip(names, widths)):
            if n in self.emas:
                flat[off:off + w] = self.emas[n].to(device)
                flat[sum(widths) + i] = 1.0
            off += w
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        have = flat[sum(widths):]
        off = 0
        for i, (n, w) in enumerate(zip(names, widths)):
            if have[i] > 0:
                self.emas[n] = flat[off:off + w] / have[i]
                self.ema_counts[n] = max(self.ema_counts.get(n, 0), 1)
            off += w

    @torch.no_grad()
    def prune(self, step: int) -> None:
        """One pruning step at optimizer step ``step`` (called by ``on_train_batch_end``)."""
        cfg = self.config
        self.target_sparsity = pm.sparsity_at(step, cfg.final_sparsity, self.start_step, self.end_step,
                                              cfg.sparsity_schedule)
        self._all_reduce_emas()
        for mod_name, lin in self._lora.items():
            w = lin.weight
            ema = self.emas.get(mod_name)
            if ema is None:  # never saw a training forward: rank by |A| alone
                ema = torch.ones(w.shape[1], device=w.device)
            old = self.masks.get(mod_name)
            if old is None:
                old = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            values = w.float()
            if cfg.regrow and mod_name in self.shadow:
                values = values + self.shadow[mod_name].to(w.device)  # pruned entries keep their last value
            new = pm.update_mask(pm.importance(values, ema.to(w.device)), old.to(w.device), self.target_sparsity,
                                 cfg.regrow)
            if cfg.regrow:
                shadow = self.shadow.get(mod_name, torch.zeros_like(values))
                shadow = shadow.to(w.device)
                newly_pruned, regrown = old & ~new, ~old & new
                shadow[newly_pruned] = values[newly_pruned]
                w[regrown] = shadow[regrown].to(w.dtype)
                shadow[regrown] = 0.0
                self.shadow[mod_name] = shadow
            self.masks[mod_name] = new
            w.mul_(new.to(w.dtype))
        self.last_pruned_step = step

    # ------------------------------------------------------------------ reporting
    def layer_report(self) -> list:
        """Per decoder layer: rank, alpha and the mean A-sparsity over its adapted modules."""
        if self.plan is None:
            return []
        rows = []
        for i, (r, a) in enumerate(zip(self.plan["ranks"], self.plan["alphas"])):
            mods = [n for n, li in self._layer_of.items() if li == i]
            sp = [1.0 - self.masks[n].float().mean().item() if n in self.masks else 0.0 for n in mods]
            rows.append({"layer": i, "rank": r, "alpha": a, "modules": len(mods),
                         "sparsity": sum(sp) / len(sp) if sp else 0.0})
        return rows

    def metrics(self) -> dict:
        out = {"prilora/target_sparsity": float(self.target_sparsity)}
        for row in self.layer_report():
            out[f"prilora/rank/layer_{row['layer']:02d}"] = float(row["rank"])
            out[f"prilora/sparsity/layer_{row['layer']:02d}"] = float(row["sparsity"])
        return out

    def on_fit_end(self, trainer, pl_module):
        if not self.config.plot or not trainer.is_global_zero or self.plan is None:
            return
        from .plot import plot_layers

        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        folder = folder or trainer.log_dir or trainer.default_root_dir
        self.plot_path = plot_layers(self.layer_report(), folder, self.PLOT_NAME,
                                     title=f"PRILoRA r {self.config.r_start}->{self.config.r_end}, "
                                           f"step {trainer.global_step}")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {"version": 1, "config": self.config.to_dict(), "plan": self.plan, "start_step": self.start_step,
                "end_step": self.end_step, "last_pruned_step": self.last_pruned_step,
                "target_sparsity": self.target_sparsity, "masks": cpu(self.masks), "emas": cpu(self.emas),
                "ema_counts": dict(self.ema_counts), "shadow": cpu(self.shadow)}

    def load_state_dict(self, state_dict: dict) -> None:
        if (state_dict.get("plan") is not None and self.plan is not None
                and state_dict["plan"]["ranks"] != self.plan["ranks"]):
            raise ValueError(f"PRILoRA: the checkpoint planned ranks {state_dict['plan']['ranks']} but this run "
                             f"planned {self.plan['ranks']}; resume with the same r_start/r_end and model.")
        if self._lora:
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state: dict) -> None:
        unknown = sorted(set(state["masks"]) - set(self._lora))
        if unknown:
            raise KeyError(f"PRILoRA checkpoint has masks for modules this model lacks, e.g. {unknown[:3]}.")
        dev = lambda n, t: t.to(self._lora[n].weight.device)  # noqa: E731
        self.plan = state["plan"] or self.plan
        self.start_step, self.end_step = state["start_step"], state["end_step"]
        self.last_pruned_step = state["last_pruned_step"]
        self.target_sparsity = state["target_sparsity"]
        self.masks = {n: dev(n, t) for n, t in state["masks"].items()}
        self.emas = {n: dev(n, t) for n, t in state["emas"].items()}
        self.ema_counts = dict(state["ema_counts"])
        self.shadow = {n: dev(n, t) for n, t in state["shadow"].items()}
        self._pending_state = None
        self.apply_masks()
