"""Layer-wise export: merge and GPTQ one decoder block at a time, read from disk, written to disk.

The in-memory export (``qft.export.pipeline.export``) holds the trained model, the merged fp32 model and
every layer's integer codes at once: about 2.8 GB for a 135M model, growing with depth. Here the model is
a skeleton on the meta device. Only the tensors outside the decoder blocks (embeddings, final norm, head)
are loaded up front. ``quantize_model`` then asks for each block just before it processes it
(``load_block``): the block's tensors are read from the base checkpoint's safetensors
(``qft.tensor_stream``), merged with the adapters (``qft.layers.adapter_delta``), and rounded through NF4
first when the adapters were trained on an NF4 base. When the block is done (``release_block``) its GPTQ
tensors go to their own safetensors shard and the block returns to the meta device. The peak is then one
block plus the embeddings plus the calibration activations, whatever the depth (BENCHMARKS.md, memory).

What it does not do (the in-memory export does): keep or refine QAT-learned grids (adapters from a QAT
run are merged and solved afresh), anchor general text to the base (``general_target="base"``), measure
drift against the trained model, or hand the work to GPTQModel.

Its last check (``qft.export.verify``) compares the written checkpoint with the merged model, which one
more pass streams block by block over the check batch before the solve. That pass also picks
``save_dtype="auto"``: the blocks are written as they are solved and cannot be rewritten, so float16 is
chosen only if every activation of the check batch stays below half its range (else bf16).

Lifecycle: ``export_layerwise`` validates its arguments and the output directory before reading any
weight; a failure removes the work directory, and a SIGKILL leaves it for the next export to clean up.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from qft import layers
from qft.tensor_stream import TensorFiles, place

from .blocks import block_linears, find_decoder_blocks
from .checkpoint import CheckpointWriter, check_output_dir, packed_layer, plain_tensors, quantization_config
from .config import GPTQConfig
from .dtype import check_dtype_name, save_candidates
from .load import load_quantized
from .merge import check_merge_into
from .offload import check_offload
from .sequential import quantize_model
from .verify import Reference, check_tokens, check_written, kl_limit

FP16_HEADROOM = 65504 / 2  # the layer-wise export's float16 choice: activations below half its range

NF4_BASES = ("none", "nf4", "nf4-dq")


def _assign(root: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    place(root, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def adapter_layers(config, adapter_dir) -> dict[str, nn.Module]:
    """``{plain layer name: peft LoRA layer}`` of the adapters in ``adapter_dir``, on a meta base (only the
    adapter weights are real), so ``qft.layers.adapter_delta`` gives each layer's merge delta."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from qft.module import LORA_PARTS

    peft_model = PeftModel.from_pretrained(_skeleton(config, torch.float32), str(adapter_dir))
    adapter = peft_model.active_adapter
    # peft leaves the adapter weights on the base's (meta) device: put the saved ones in by name
    for key, tensor in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():  # small
        for part in LORA_PARTS:
            key = key.replace(f".{part}.weight", f".{part}.{adapter}.weight")
        _assign(peft_model, key, tensor, torch.float32)
    on_meta = [n for n, p in peft_model.named_parameters() if "lora_" in n and p.device.type == "meta"]
    if on_meta:
        raise KeyError(f"--adapter {adapter_dir}: adapter_model.safetensors lacks {on_meta[:3]}.")
    return {layers.hf_name(n): m for n, m in layers.linear_layers(peft_model).items() if layers.adapters(m)}


def export_layerwise(model_dir, output_dir, cfg: GPTQConfig, tokens: torch.Tensor | None, adapter_dir=None,
                     base_quantization: str = "none", merge_into: str = "trained", tokenizer=None,
                     overwrite: bool = False, device=None, dtype: str = "auto", save_dtype: str = "auto",
                     progress: bool = True, reuse_outputs: bool = True, calibration_offload: str = "none") -> dict:
    """Quantize the model in ``model_dir`` (a Hugging Face directory with safetensors), merged with the
    peft adapters in ``adapter_dir`` if given, into a GPTQ checkpoint at ``output_dir``, block by block.

    ``base_quantization``: what the adapters were trained on (``"nf4"``/``"nf4-dq"``: with
    ``merge_into="trained"`` each base weight is rounded through NF4 before the merge, as training saw it).
    ``reuse_outputs=False`` recomputes a block's sub-module outputs instead of keeping them, for less
    memory and more time (``quantize_model``); ``calibration_offload`` keeps the cached calibration
    activations in host memory (``"cpu"``) or temporary files (``"disk"``) instead of on ``device``
    (``qft.export.offload``). Returns the summary, also written as ``qft_export.json``.
    """
    from transformers import AutoConfig

    from .pipeline import resolve_dtype

    if base_quantization not in NF4_BASES:
        raise ValueError(f"export_layerwise(base_quantization={base_quantization!r}): allowed {list(NF4_BASES)}.")
    merge_into = check_merge_into(merge_into)
    check_dtype_name(save_dtype, "save_dtype", "export_layerwise")
    if cfg.method == "gptq" and tokens is None:
        raise ValueError("export_layerwise: GPTQ needs calibration tokens (or method='rtn').")
    if cfg.pruning:
        raise ValueError(f"export_layerwise(sparsity={cfg.sparsity}): pruning is not wired into the layer-wise "
                         "writer yet; use qft.export.export (or qft export without --layerwise).")
    if cfg.awq:
        raise ValueError(f"export_layerwise(method={cfg.method!r}): AWQ's scale search needs the whole model in "
                         "memory; use qft.export.export (or qft export without --layerwise).")
    check_offload(calibration_offload)
    check_output_dir(output_dir, overwrite)
    files = TensorFiles(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    device = torch.device(device or "cpu")
    compute = resolve_dtype(dtype, device) if cfg.method == "gptq" else torch.float32
    t0 = time.perf_counter()
    model = _skeleton(config, compute)
    prefix, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[str]] = {}
    outside = []
    for n in files.names():
        if n.startswith(prefix + "."):
            by_block.setdefault(int(n[len(prefix) + 1:].split(".")[0]), []).append(n)
        else:
            outside.append(n)
    for name in outside:  # the embedding converted chunk by chunk as it is read
        place(model, name, files.read(name, compute if files.dtype(name).is_floating_point else None))
    model.tie_weights()
    deltas = adapter_layers(config, adapter_dir) if adapter_dir else {}
    nf4 = base_quantization if merge_into == "trained" else "none"
    writer = CheckpointWriter(output_dir, overwrite, n_shards=len(blocks) + 1)

    def load_block(i: int, block: nn.Module) -> None:
        head = f"{prefix}.{i}."
        lins = {f"{head}{n}" for n in block_linears(block)}
        for name in by_block.get(i, []):
            tensor, layer = files.read(name), name.rpartition(".")[0]
            if layer in lins and name.endswith(".weight"):
                tensor = tensor.float()
                if nf4 != "none":  # the base the adapters trained on: the weight rounded through NF4
                    from qft.qlora import nf4_linear

                    tensor = layers.base_weight(nf4_linear(tensor, None, nf4 == "nf4-dq", torch.float32))
                delta = layers.adapter_delta(deltas[layer]) if layer in deltas else None
                tensor = tensor if delta is None else tensor + delta
            _assign(model, name, tensor, compute)

    def release_block(i: int, block: nn.Module, quantized: dict) -> None:
        head = f"{prefix}.{i}."
        shard, done = {}, set()
        for name, qw in quantized.items():
            shard.update(packed_layer(name, qw, model.get_submodule(name).bias, save, cfg.checkpoint_format))
            done |= {f"{name}.weight", f"{name}.bias"}
        shard.update(plain_tensors(block, done, save, prefix=head))
        writer.add(shard)
        block.to("meta")  # frees the block's weights (quantize_model then trims the heap: qft.memory)

    save = None
    try:
        ref, peak = _streamed_reference(model, blocks, load_block, check_tokens(tokens, tokenizer, config.vocab_size))
        candidates = save_candidates(save_dtype, config, device, compute)
        if save_dtype == "auto" and peak >= FP16_HEADROOM:
            candidates = [d for d in candidates if d != torch.float16]
        save = candidates[0]
        _, rows = quantize_model(model, cfg, tokens, device=device, progress=progress, reuse_outputs=reuse_outputs,
                                 load_block=load_block, release_block=release_block,
                                 calibration_offload=calibration_offload)
        block_names = {f"{prefix}.{i}." for i in range(len(blocks))}
        writer.add(plain_tensors(model, {k for k in model.state_dict() if k.startswith(tuple(block_names))}, save))
        summary = {"layerwise": True, "blocks": len(blocks), "merge_into": merge_into, "adapters": len(deltas),
                   "base_quantization": base_quantization, "config": cfg.to_dict(), "dtype": str(compute)[6:],
                   "calibration": None if tokens is None else list(tokens.shape),
                   "save_dtype": str(save).replace("torch.", ""), "check_batch_peak_activation": peak,
                   "seconds": time.perf_counter() - t0}
        verify = lambda tmp: check_written(load_quantized(tmp, device, save), ref, kl_limit(cfg.bits),  # noqa: E731
                                           "export_layerwise", save)
        out = writer.finish(model, quantization_config(cfg), save, tokenizer, rows, {"qft_export.json": summary},
                            verify=verify)
    except BaseException:
        writer.abort()
        raise
    summary["output_dir"] = str(out)
    return summary


@torch.inference_mode()
def _streamed_reference(model: nn.Module, blocks, load_block, tokens: torch.Tensor) -> tuple[Reference, float]:
    """The merged model's answer on the check batch, each block loaded just before it runs and dropped
    after, and the largest activation magnitude seen (for the float16 choice)."""
    peak = [0.0]

    def look(mod, args, out):
        out = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            peak[0] = max(peak[0], float(out.detach().abs().max()))

    handles = [m.register_forward_hook(look) for m in model.modules()]
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: load_block(i, m)))
        handles.append(block.register_forward_hook(lambda m, a, o: m.to("meta") and None))
    try:
        ref = Reference(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return ref, peak[0]


def adapter_base(adapter_dir) -> tuple[str | None, str]:
    """``(base model name, quantization)`` an adapter directory records (peft's config, qft's meta file)."""
    from qft.module import QFT_ADAPTER_META

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    meta_file = adapter_dir / QFT_ADAPTER_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return meta.get("model") or cfg.get("base_model_name_or_path"), meta.get("quantization", "none")
