"""``qft export``: the post-fit export from the command line (wired into ``qft/cli.py`` by the lead).

    qft export --ckpt runs/last.ckpt --output out/int4 --bits 4 --group-size 64 --calibration data.txt
    qft export --adapter runs/adapter --model smollm2-135m --output out/int4 --calibration data.txt

``--ckpt`` is a qft Lightning checkpoint (adapters + qft state; the base is rebuilt from its hyper-
parameters, PRILoRA ranks and masks from the PRILoRA callback state). ``--adapter`` is a peft adapter
directory (``adapter_config.json`` + weights). Either way the merge/GPTQ/write path is
``qft.export.pipeline.export``, the same one ``GPTQExportCallback`` runs.
"""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

from .calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN, calibration_tokens, model_max_length
from .checkpoint import check_output_dir
from .config import HESSIAN_DTYPES, SUPPORTED_BITS, GPTQConfig
from .merge import MERGE_INTO
from .pipeline import BACKENDS, DTYPES, check_backend, export

_D = GPTQConfig()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="qft Lightning checkpoint (.ckpt) of a fine-tuned CausalLMModule")
    src.add_argument("--adapter", help="peft adapter directory (adapter_config.json)")
    parser.add_argument("--model", help="base model (built-in name or path); default: from the checkpoint/adapter")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (must not exist)")
    parser.add_argument("--calibration", required=True, help="calibration text file")
    parser.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--bits", type=int, default=_D.bits, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=_D.group_size, help="-1 = one scale per output row")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    parser.add_argument("--desc-act", action="store_true", help="act-order (static groups)")
    parser.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                        help="group-aware reordering (g_idx stays natural); default: on unless --desc-act")
    parser.add_argument("--no-true-sequential", action="store_true")
    parser.add_argument("--damp-percent", type=float, default=_D.damp_percent)
    parser.add_argument("--hessian-dtype", default=_D.hessian_dtype, choices=HESSIAN_DTYPES)
    parser.add_argument("--mse", action="store_true", help="grid-search the clipping range")
    parser.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    parser.add_argument("--merge-into", default="original", choices=MERGE_INTO)
    parser.add_argument("--backend", default="qft", choices=BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-drift", action="store_true", help="skip the merged-vs-trained drift measurement")
    return parser


def _from_ckpt(path: str, model_name: str | None, merge_into: str):
    """Rebuild the trained module from a qft checkpoint: ``(model, tokenizer, base name, PRILoRA masks)``."""
    from qft.module import CausalLMModule

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if model_name:
        hp["model"] = model_name
    allowed = set(inspect.signature(CausalLMModule.__init__).parameters) - {"self"}
    module = CausalLMModule(**{k: v for k, v in hp.items() if k in allowed})
    masks = None
    for state in (ckpt.get("callbacks") or {}).values():
        plan = state.get("plan") if isinstance(state, dict) else None
        if plan and "ranks" in plan:  # PRILoRA: per-layer ranks must exist before the adapter weights load
            from qft.prilora.math import layer_key

            keys = [layer_key(plan["layers_prefix"], i) for i in range(len(plan["ranks"]))]
            module.rank_pattern = dict(zip(keys, plan["ranks"]))
            module.alpha_pattern = dict(zip(keys, plan["alphas"]))
            masks = {k.removeprefix("model."): v for k, v in (state.get("masks") or {}).items()} or None
    module.configure_model()
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise RuntimeError(f"--ckpt {path}: {len(unexpected)} tensors do not fit the rebuilt model, e.g. {unexpected[:3]}")
    return module.model, module.tokenizer, hp.get("model"), masks


def _from_adapter(path: str, model_name: str | None, merge_into: str):
    from peft import PeftModel

    from qft.models import load_model, load_tokenizer

    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--adapter {path}: no adapter_config.json; pass a peft adapter directory.")
    model_name = model_name or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not model_name:
        raise ValueError("--adapter: the adapter does not name its base model; pass --model.")
    base = load_model(model_name, dtype=torch.float32)
    if merge_into == "dequantized_nf4":
        from qft.qlora import quantize_nf4

        quantize_nf4(base)
    return PeftModel.from_pretrained(base, path).eval(), load_tokenizer(model_name), model_name, None


def run(args) -> dict:
    """Validate everything, then merge, quantize and write; prints and returns the summary."""
    cfg = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.desc_act,
                     act_group_aware=args.act_group_aware,
                     true_sequential=not args.no_true_sequential, damp_percent=args.damp_percent,
                     hessian_dtype=args.hessian_dtype, mse=args.mse, method=args.method)
    check_backend(args.backend)
    check_output_dir(args.output, args.overwrite)
    if not Path(args.calibration).is_file():
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file (a text file is expected).")
    load = _from_ckpt if args.ckpt else _from_adapter
    model, tok, base_name, masks = load(args.ckpt or args.adapter, args.model, args.merge_into)
    tokens = calibration_tokens(args.calibration, tok, args.n_samples, args.seq_len, max_length=model_max_length(model))
    summary = export(model, tok, tokens, args.output, cfg, base_name=base_name, merge_into=args.merge_into,
                     masks=masks, backend=args.backend, device=args.device, dtype=args.dtype,
                     overwrite=args.overwrite, measure_drift=not args.no_drift)
    print(json.dumps({k: summary[k] for k in ("output_dir", "drift", "quantize_s", "seconds") if k in summary}, indent=2))
    return summary


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="qft export", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
