"""Fold a fine-tuned model into a plain full-precision Hugging Face model, and measure what that changed.

Every linear layer is read through ``qft.layers`` (plain, NF4, LoRA over either, fake-quant,
converted), so one function serves QLoRA, LoRA, full fine-tunes and QAT-trained models alike: each
layer's weight is its base plus its adapters' ``scaling * B @ A``. Only the base of a frozen layer is
a choice (``merge_into``):

- ``"trained"``: the base the adapters were trained on, i.e. the dequantized NF4 weights of a QLoRA
  model; the merged model computes what the trained one did (up to fp rounding);
- ``"original"``: the released full-precision weights, reloaded (Hugging Face's recipe after QLoRA).
  The adapter learned to correct the NF4 rounding, which those weights do not have, so this merge
  drifts: on the demo's task it alone costs 12 points of accuracy (BENCHMARKS.md, merge target).

``"dequantized_nf4"`` is accepted as the older name of ``"trained"``. Trained (not frozen) weights,
of a full fine-tune or ``modules_to_save``, are always taken as trained.

PRILoRA masks (``{lora module name: mask shaped like A}``) are optional: the callback zeroes the
pruned entries of ``A`` in place after every optimizer step, so a trained ``A`` already carries them.

Everything here runs on the CPU, layer by layer: the full-precision model is never put on an accelerator.
"""
from __future__ import annotations

import torch
from torch import nn

from qft import layers

MERGE_INTO = ("trained", "original", "dequantized_nf4")
DEFAULT_MERGE_INTO = "trained"


def check_merge_into(value: str, where: str = "") -> str:
    """Validate ``merge_into`` (``where`` names the caller in the error) and resolve its alias."""
    if value not in MERGE_INTO:
        arg = f"{where}(merge_into={value!r})" if where else f"merge_into={value!r}"
        raise ValueError(f"{arg} is unknown; allowed: {list(MERGE_INTO)} ('trained': the base the adapters were "
                         "trained on, e.g. dequantized NF4; 'original': the released fp weights).")
    return "trained" if value == "dequantized_nf4" else value


def _masks_by_hf_name(masks) -> dict:
    return {layers.hf_name(k.removeprefix("model.") if k.startswith("model.base_model.") else k): v
            for k, v in (masks or {}).items()}


@torch.no_grad()
def lora_deltas(model: nn.Module, masks: dict | None = None) -> dict[str, torch.Tensor]:
    """``{HF layer name: fp32 delta [out, in]}`` of every layer with active LoRA adapters (masks on A)."""
    masks = _masks_by_hf_name(masks)
    out = {}
    for name, m in layers.linear_layers(layers.unwrap(model)).items():
        d = layers.adapter_delta(m, masks.get(name))
        if d is not None:
            out[name] = d.cpu()
    return out


def _non_layer_state(hf: nn.Module, layer_names) -> dict:
    """Tensors of ``hf`` outside its linear layers (embeddings, norms, head), under plain-model names."""
    prefixes = tuple(n + "." for n in layer_names)
    out = {}
    for k, v in hf.state_dict().items():
        if k.startswith(prefixes) or ".original_module." in k:
            continue
        out[k.replace(".modules_to_save.default.", ".")] = v  # peft's trained copy of a saved module
    return out


@torch.no_grad()
def merge_adapters(trained: nn.Module, base: nn.Module | str | None = None, merge_into: str = DEFAULT_MERGE_INTO,
                   masks: dict | None = None) -> nn.Module:
    """A plain fp32 Hugging Face model (every linear an ``nn.Linear``) equal to ``trained`` before fake-quant.

    ``base`` (a model or a ``qft.models`` name) is needed only for ``merge_into="original"``, whose frozen
    base weights come from it. ``trained`` is left unchanged.
    """
    from transformers import AutoModelForCausalLM

    merge_into = check_merge_into(merge_into)
    hf = layers.unwrap(trained)
    found = layers.linear_layers(hf)
    original = None
    if merge_into == "original" and any(not layers.base_trainable(m) for m in found.values()):
        if base is None:
            raise ValueError("merge_into='original' needs the original base model (a qft.models name or a model), "
                             "e.g. base='smollm2-135m'; or use merge_into='trained'.")
        if isinstance(base, str):
            from qft.models import load_model

            base = load_model(base, dtype=torch.float32)
        original = {n: m for n, m in base.named_modules()}
    masks = _masks_by_hf_name(masks)
    from qft.sparsity import is_sparse

    keep_zeros = is_sparse(hf)  # a pruned base keeps its zeros (qft.sparsity)
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
          for k, v in _non_layer_state(hf, found).items()}
    for name, m in found.items():
        if original is not None and not layers.base_trainable(m):
            ref = original.get(name)
            if ref is None or not hasattr(ref, "weight"):
                raise KeyError(f"merge: layer {name} has no counterpart in the original base model; was the adapter "
                               "trained on a different model?")
            w = ref.weight.detach().float().cpu()
        else:
            w = layers.base_weight(m).cpu()
        d = layers.adapter_delta(m, masks.get(name))
        if d is not None:
            if d.shape != w.shape:
                raise KeyError(f"merge: adapter of {name} has shape {tuple(d.shape)}, "
                               f"the base weight {tuple(w.shape)}.")
            w = w + (d.cpu() * (w != 0) if keep_zeros else d.cpu())
        sd[f"{name}.weight"] = w
        b = layers.bias(m)
        if b is not None:
            sd[f"{name}.bias"] = b.detach().float().cpu()
    plain = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or []) | (
        {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) else set())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"merge: the merged weights do not fit {type(plain).__name__}: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if getattr(hf.config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(hf, "generation_config", None) is not None:
        plain.generation_config = hf.generation_config
    return plain.eval()


@torch.no_grad()
def drift(reference: nn.Module, merged: nn.Module, tokens: torch.Tensor, max_samples: int = 4,
          max_len: int = 256) -> dict:
    """How far ``merged`` is from the trained ``reference`` on calibration batches.

    ``kl``: mean over tokens of KL(p_reference || p_merged); ``max_logit_diff``: max |logit difference|.
    Runs on the CPU on ``max_samples x max_len`` tokens (enough to catch a wrong merge, cheap to run).
    """
    x = tokens[:max_samples, :max_len].cpu()
    kls, mx = [], 0.0
    ref_dev = next(reference.parameters()).device
    merged_dev = next(merged.parameters()).device
    for row in x:
        a = reference(input_ids=row[None].to(ref_dev)).logits.float().cpu()
        b = merged(input_ids=row[None].to(merged_dev)).logits.float().cpu()
        pa, pb = a.log_softmax(-1), b.log_softmax(-1)
        kls.append((pa.exp() * (pa - pb)).sum(-1).mean())
        mx = max(mx, float((a - b).abs().max()))
    return {"kl": float(torch.stack(kls).mean()), "max_logit_diff": mx, "tokens": int(x.numel())}
