"""The W8A8 model as a compressed-tensors checkpoint (``format: int-quantized``), and back.

The file is what llm-compressor writes for its W8A8 int8 recipes and what vLLM's compressed-tensors
W8A8 int8 scheme reads: each quantized linear's ``weight`` in int8 ``[out, in]`` with ``weight_scale``
``[out, 1]`` (symmetric: no zero point), plus ``input_scale`` ``[1]`` when activations are static; every
other tensor in floating point; ``quantization_config`` built with compressed-tensors' own pydantic
models, so a field it does not know cannot slip in. Scales are stored in fp32, the values qft evaluated.

Written atomically like the GPTQ checkpoints (``qft.export.checkpoint.CheckpointWriter``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qft.export.checkpoint import CheckpointWriter, _candidates, _same_as, plain_tensors, write_checked

from .config import W8A8Config
from .layer import W8A8Linear


def _ct():
    try:
        import compressed_tensors.quantization as ctq
    except ImportError as e:  # lazy: only W8A8 export needs it
        raise ImportError("W8A8 checkpoints need compressed-tensors: pip install 'qft[w8a8]' "
                          "(or pip install compressed-tensors).") from e
    return ctq


def quantization_config(cfg: W8A8Config, ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` for ``cfg``, through compressed-tensors' own models."""
    ctq = _ct()
    dynamic = cfg.activation == "dynamic"
    weights = ctq.QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    inputs = ctq.QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token" if dynamic else "tensor",
                                  dynamic=dynamic)
    scheme = ctq.QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    qc = ctq.QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="int-quantized",
                                quantization_status="compressed")
    return qc.to_dict()


def w8a8_layers(model: nn.Module) -> dict[str, W8A8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


def save_w8a8(model: nn.Module, output_dir, cfg: W8A8Config, tokenizer=None, overwrite: bool = False,
              dtype: torch.dtype | None = None, extra_files: dict | None = None, verify=None) -> Path:
    """Write ``model`` (after ``quantize_w8a8``) to ``output_dir``; returns the final directory.

    ``dtype``: of the tensors left in floating point; None picks one the model runs correctly in
    (``qft.export.dtype``). ``verify(work_dir, dtype)``: the last check before the rename
    (``qft.export.verify``); by default, the checkpoint loaded back must compute what ``model`` does."""
    layers = w8a8_layers(model)
    if not layers:
        raise ValueError("save_w8a8: the model has no W8A8Linear layers; run qft.ptq.quantize_w8a8 first.")
    dynamic = {m.dynamic for m in layers.values()}
    if dynamic != {cfg.activation == "dynamic"}:
        raise ValueError(f"save_w8a8: cfg.activation={cfg.activation!r} but the model's layers are "
                         f"{'dynamic' if True in dynamic else 'static'}; pass the config the model was quantized with.")
    unquantized = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
    qconfig = quantization_config(cfg, ignore=unquantized)
    verify = verify or _same_as(model, tokenizer, load_w8a8, "save_w8a8")

    def write(dtype):
        sd, skip = {}, set()
        for name, m in layers.items():
            sd[f"{name}.weight"] = m.weight.detach().cpu().contiguous()
            sd[f"{name}.weight_scale"] = m.weight_scale.detach().cpu().float().contiguous()
            if m.input_scale is not None:
                sd[f"{name}.input_scale"] = m.input_scale.detach().cpu().float().contiguous()
            if m.bias is not None:
                sd[f"{name}.bias"] = m.bias.detach().cpu().to(dtype).contiguous()
            skip |= {f"{name}.{k}" for k in ("weight", "weight_scale", "input_scale", "bias")}
        sd.update(plain_tensors(model, skip, dtype))
        writer = CheckpointWriter(output_dir, overwrite)
        try:
            writer.add(sd)
            return writer.finish(model, qconfig, dtype, tokenizer, extra_files=extra_files,
                                 verify=lambda tmp: verify(tmp, dtype))
        except BaseException:
            writer.abort()
            raise

    return write_checked(write, _candidates(model, dtype), "save_w8a8", (extra_files or {}).get("qft_export.json"))


def load_w8a8(path, dtype: torch.dtype | None = None, int8_kernel: bool = False) -> nn.Module:
    """A W8A8 compressed-tensors checkpoint as a pure-torch model (``W8A8Linear`` layers), no extra package.

    ``dtype``: of the floating-point tensors and the compute; by default the one the checkpoint declares
    (float16 that overflows on a probe batch runs in bf16 instead, with a warning: ``qft.export.dtype``)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from qft.export.dtype import checkpoint_dtype, loadable_dtype

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "int-quantized":
        raise ValueError(f"load_w8a8({str(path)!r}): not a compressed-tensors int-quantized checkpoint "
                         f"(quant_method={qc.get('quant_method')!r}, format={qc.get('format')!r}).")
    requested, dtype = dtype is not None, dtype or checkpoint_dtype(path)
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    modules = dict(model.named_modules())
    for key in [k for k in sd if k.endswith(".weight_scale")]:
        name = key[: -len(".weight_scale")]
        parent, _, child = name.rpartition(".")
        bias = sd.pop(f"{name}.bias", None)
        setattr(modules[parent], child, W8A8Linear(sd.pop(f"{name}.weight"), sd.pop(key),
                                                   sd.pop(f"{name}.input_scale", None),
                                                   None if bias is None else bias.to(dtype), int8_kernel))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=False,
                          assign=True)
    model.tie_weights()
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if meta:
        raise KeyError(f"load_w8a8({str(path)!r}): the checkpoint lacks {meta[:3]}.")
    return loadable_dtype(path, model.eval(), dtype, requested, lambda d: load_w8a8(path, d, int8_kernel))
