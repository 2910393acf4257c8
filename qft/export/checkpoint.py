"""Write a Hugging Face GPTQ checkpoint (the "gptq" format transformers/optimum/gptqmodel read).

Layout: ``config.json`` with a ``quantization_config``, ``quantize_config.json`` (AutoGPTQ's copy of it),
``model.safetensors`` holding ``<layer>.qweight/qzeros/scales/g_idx`` (packed by ``qft.quant.pack_gptq``:
int32 words, v1 zero points, fp16 scales) for every quantized linear and plain tensors for the rest, the
tokenizer, and the per-layer quantization report.

The write is atomic: everything goes to a hidden temporary sibling directory that is renamed into place
at the end, so a crash never leaves a half-written checkpoint, and an existing directory is never
replaced unless ``overwrite=True``. What a SIGKILL leaves (the hidden directories) is cleaned up, and an
interrupted overwrite put back, by the next export of the same directory (``clean_abandoned``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qft.quant import QuantizedWeight, pack_gptq
from qft.quant.pack import pack_awq

from .config import GPTQConfig
from .prune import PrunedWeight


def work_dir(out: Path, kind: str) -> Path:
    """A hidden sibling ``.<name>.<kind>-<pid>-XXXX`` of ``out`` to work in: the pid lets a later run tell
    a directory that an export killed mid-way left behind (``clean_abandoned``) from one still in use."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_abandoned(out: Path) -> list[str]:
    """Deal with what a SIGKILLed export of ``out`` left beside it; returns what was done, one line each.

    A killed export leaves at most its hidden work directories (the final rename is the only step that
    touches ``out``). ``.tmp-``/``.gptqmodel-`` ones hold an unfinished result and are removed. An ``.old-``
    one holds the previous result, moved aside by an ``overwrite`` swap: if the kill fell between the two
    renames, ``out`` is missing and the previous result is put back, so nothing is lost; otherwise it is
    the replaced result and is removed. Directories of live processes are left alone.
    """
    done = []
    if not out.parent.is_dir():
        return done
    for d in sorted(out.parent.glob(f".{out.name}.*-*")):
        parts = d.name[len(out.name) + 2:].split("-")
        if len(parts) < 3 or parts[0] not in ("tmp", "old", "gptqmodel") or not parts[1].isdigit():
            continue
        if _alive(int(parts[1])):  # still at work (this process included)
            continue
        if parts[0] == "old" and (d / out.name).is_dir() and not out.exists():
            os.rename(d / out.name, out)
            done.append(f"restored {out} from {d.name}, where an interrupted overwrite had moved it")
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d.name}, left by an interrupted export")
    return done


def check_output_dir(output_dir, overwrite: bool = False) -> Path:
    """Fail early (before calibration) when ``output_dir`` exists and ``overwrite`` is off, after cleaning up
    (and reporting on stderr) what an interrupted export of the same directory left behind."""
    import sys

    out = Path(output_dir)
    for line in clean_abandoned(out.absolute()):
        print(f"qft export: {line}", file=sys.stderr)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output_dir={str(out)!r} already exists; pass overwrite=True (CLI: --overwrite) to "
                              "replace it, or choose a new directory.")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir={str(out)!r} exists and is not a directory.")
    return out


def qft_version() -> str:
    import qft

    return getattr(qft, "__version__", "0")


def quantization_config(cfg: GPTQConfig) -> dict:
    """The ``quantization_config`` block of ``config.json`` (GPTQ's, or AWQ's for ``method="awq"``)."""
    if cfg.checkpoint_format == "awq":
        return {"quant_method": "awq", "bits": cfg.bits, "group_size": cfg.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None,
                "meta": {"quantizer": [f"qft:{qft_version()}"], "method": cfg.method, "sym": cfg.sym}}
    return {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "true_sequential": cfg.true_sequential,
        "damp_percent": cfg.damp_percent,
        "damp_auto_increment": cfg.damp_auto_increment,
        "static_groups": cfg.static_groups,
        "lm_head": False,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"qft:{qft_version()}"], "method": cfg.method, "mse": cfg.mse,
                 "act_group_aware": cfg.act_group_aware},
    }


def sparsity_config(cfg: GPTQConfig, quantized: dict) -> dict:
    """What the pruning did, for ``config.json``: the method, pattern and target, and the fraction of the
    pruned layers' weights that are zero in the file (rounded codes at the zero point included)."""
    zeros = total = 0
    for qw in quantized.values():
        w = qw.dequantize()
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return {"format": "dense", "sparsity_structure": cfg.sparsity_pattern, "method": cfg.prune_method,
            "target_sparsity": cfg.sparsity, "measured_sparsity": zeros / max(total, 1),
            "ignore": ["lm_head"], "quantizer": f"qft:{qft_version()}"}


def write_checked(write, candidates: list[torch.dtype], what: str, summary: dict | None = None) -> Path:
    """``write(dtype)`` in the first of ``candidates`` whose written checkpoint passes its last check
    (``qft.export.verify``, run by ``write`` before the rename); returns the directory. With one candidate
    (an explicit ``save_dtype``) a failed check is the refusal. Only logits that are not finite (a range
    problem) send it to the next dtype; a checkpoint that is finite but far off is refused at once.
    ``summary`` (written by ``write``) gets ``save_dtype`` and, for the dtypes that failed before it,
    ``save_dtypes_refused``."""
    from .verify import ExportCheckError

    failures = []
    for dtype in candidates:
        if summary is not None:
            summary["save_dtype"] = str(dtype).replace("torch.", "")
            if failures:
                summary["save_dtypes_refused"] = {str(d).replace("torch.", ""): str(e) for d, e in failures}
        try:
            return write(dtype)
        except ExportCheckError as e:
            if not e.nonfinite:
                raise
            failures.append((dtype, e))
    if len(failures) == 1:
        raise failures[0][1]
    tried = ", ".join(str(d).replace("torch.", "") for d, _ in failures)
    raise ExportCheckError(f"{what}: no dtype passed the check ({tried}). The last: {failures[-1][1]}",
                           nonfinite=True, found=failures[-1][1].found)


def packed_layer(name: str, qw: QuantizedWeight, bias, dtype: torch.dtype, fmt: str = "gptq") -> dict:
    """The tensors of one quantized linear and its bias: GPTQ's ``<name>.qweight/qzeros/scales/g_idx``,
    or AWQ's GEMM ``qweight/qzeros/scales`` (``fmt="awq"``)."""
    packed = pack_awq(qw.codes, qw.scale, qw.zero) if fmt == "awq" else \
        pack_gptq(qw.codes, qw.scale, qw.zero, qw.g_idx, qw.bits)
    sd = {f"{name}.{k}": v.contiguous().clone() for k, v in packed.items()}
    if bias is not None:
        sd[f"{name}.bias"] = bias.detach().to("cpu", dtype).contiguous()
    return sd


def plain_tensors(module, skip: set[str], dtype: torch.dtype, prefix: str = "") -> dict:
    """``module``'s state (floating tensors in ``dtype``) under ``prefix``, minus ``skip``; a tensor shared
    by two names (lm_head = embed_tokens) is kept once and re-tied on load."""
    sd, seen = {}, set()
    for k, v in module.state_dict().items():
        k = prefix + k
        if k in skip:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        v = v.detach().to("cpu")
        sd[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
    return sd


def quantized_state_dict(model, quantized: dict[str, QuantizedWeight], dtype: torch.dtype,
                         fmt: str = "gptq") -> dict:
    """Full state dict with each quantized linear replaced by its packed tensors (``packed_layer``)."""
    modules = dict(model.named_modules())
    sd, skip = {}, set()
    for name, qw in quantized.items():
        if isinstance(qw, PrunedWeight):  # pruned, not rounded: the model's own (zeroed) weight is written
            continue
        bias = getattr(modules[name], "bias", None)
        sd.update(packed_layer(name, qw, bias, dtype, fmt))
        skip |= {f"{name}.weight", f"{name}.bias"}
    sd.update(plain_tensors(model, skip, dtype))
    return sd


class CheckpointWriter:
    """A quantized checkpoint (GPTQ, compressed-tensors) written into a hidden work directory and renamed
    into place by ``finish``.

    ``add`` writes one safetensors shard at a time (a layer-wise export writes a block per shard, so no
    step holds more than one block's tensors); ``finish`` writes the shard index when there are several,
    the config with its ``quantization_config``, the tokenizer and the report, then swaps the directory
    in. Any exception (or ``abort``) removes the work directory; a SIGKILL leaves it for the next export
    of the same directory to clean up (``clean_abandoned``).
    """

    def __init__(self, output_dir, overwrite: bool = False, n_shards: int = 1):
        self.out = check_output_dir(output_dir, overwrite).resolve()
        self.overwrite, self.n_shards = overwrite, n_shards
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = work_dir(self.out, "tmp")
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict) -> None:
        from safetensors.torch import save_file

        i = len(set(self.weight_map.values())) + 1
        if i > self.n_shards:
            raise ValueError(f"CheckpointWriter: shard {i} of {self.n_shards}.")
        name = "model.safetensors" if self.n_shards == 1 else f"model-{i:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in tensors})

    def finish(self, model, qconfig: dict | None, dtype: torch.dtype, tokenizer=None, report_rows=None,
               extra_files: dict | None = None, extra_config: dict | None = None, verify=None) -> Path:
        """``qconfig``: the ``quantization_config`` of ``config.json`` (GPTQ's: ``quantization_config(cfg)``;
        None for floating-point weights); ``extra_config``: more ``config.json`` keys (``sparsity_config``).
        ``verify(work_dir)``: the last check (``qft.export.verify``), run on the written files before the
        rename; what it returns goes into ``qft_export.json`` as ``check``, what it raises stops the export."""
        tmp = self.tmp
        if self.n_shards > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2) + "\n")
        config = model.config.to_dict()
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        config["dtype"] = str(dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        config.pop("quantization_config", None)
        if qconfig is not None:
            config["quantization_config"] = qconfig
        config.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if qconfig is not None and qconfig.get("quant_method") == "gptq":  # AutoGPTQ's and GPTQModel's own copy
            (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report_rows:
            from .report import write_report

            write_report(report_rows, tmp)
        if verify is not None:
            found = verify(tmp)
            summary = (extra_files or {}).get("qft_export.json")
            if isinstance(summary, dict):
                summary["check"] = found
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        _swap_into_place(tmp, self.out, self.overwrite)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_quantized(model, quantized: dict[str, QuantizedWeight], cfg: GPTQConfig, output_dir, tokenizer=None,
                   overwrite: bool = False, dtype: torch.dtype | None = None, report_rows: list | None = None,
                   extra_files: dict | None = None, verify=None) -> Path:
    """Write the checkpoint atomically (one shard); returns the final directory.

    ``dtype``: of the tensors left in floating point; None picks one the model runs correctly in
    (``qft.export.dtype``). ``verify(work_dir, dtype)``: the last check before the rename
    (``qft.export.verify``); by default, the checkpoint loaded back must compute what ``model`` (its
    weights now on the grid) computes."""
    from .load import load_quantized

    qconfig = None if cfg.checkpoint_format == "dense" else quantization_config(cfg)
    extra = {"sparsity_config": sparsity_config(cfg, quantized)} if cfg.pruning else None
    verify = verify or _same_as(model, tokenizer, load_quantized, "save_quantized")

    def write(d):
        writer = CheckpointWriter(output_dir, overwrite)
        try:
            writer.add(quantized_state_dict(model, quantized, d, cfg.checkpoint_format))
            return writer.finish(model, qconfig, d, tokenizer, report_rows, extra_files, extra,
                                 lambda tmp: verify(tmp, d))
        except BaseException:
            writer.abort()
            raise

    return write_checked(write, _candidates(model, dtype), "save_quantized", (extra_files or {}).get("qft_export.json"))


def _candidates(model, dtype: torch.dtype | None) -> list[torch.dtype]:
    from .dtype import save_candidates

    if dtype is not None:
        return [dtype]
    return save_candidates("auto", model.config, next(model.parameters()).device, next(model.parameters()).dtype)


def _same_as(model, tokenizer, load, what: str):
    """The default last check of a low-level save: the file, loaded back, computes what ``model`` does."""
    from .verify import Reference, check_tokens, check_written, kl_limit

    ref = Reference(model, check_tokens(None, tokenizer, model.config.vocab_size))
    return lambda tmp, d: check_written(load(tmp, dtype=d), ref, kl_limit(8), what, d)


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:  # appeared while we were working
            raise FileExistsError(f"output_dir={str(out)!r} appeared during the export; not overwriting it.")
        old = work_dir(out, "old")
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
