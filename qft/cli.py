"""The ``qft`` command.

- ``qft fit|validate|test --config recipes/X.yaml [--trainer.max_steps=10 ...]``: LightningCLI over
  any LightningModule/DataModule class path (defaults: ``CausalLMModule`` and ``QFTDataModule``).
- ``qft eval``: perplexity on a text file and accuracy on the synthetic task, for a base model, a
  Lightning checkpoint, a peft adapter directory or an exported GPTQ checkpoint.
- ``qft export``: merge adapters and quantise with GPTQ (``qft.export``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# what qft raises on purpose when an argument is wrong (its message names the argument, value and fix)
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)
PACKAGE = Path(__file__).resolve().parent


def _raised_by_qft(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def user_error(exc: BaseException) -> BaseException | None:
    """The validation error qft raised, if ``exc`` is one or wraps one, else ``None``.

    jsonargparse reports a class whose ``__init__`` refused an argument inside its own "does not validate
    against any of the Union subtypes" error; the qft error is on that error's cause chain.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, USER_ERRORS) and _raised_by_qft(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def lightning_cli(args: list[str] | None = None, run: bool = True):
    from pytorch_lightning.cli import LightningCLI

    from .data import QFTDataModule
    from .module import CausalLMModule

    return LightningCLI(CausalLMModule, QFTDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=args, run=run)


def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="base model: built-in name, local path or HF id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="Lightning checkpoint of a CausalLMModule (adapters/trainable weights)")
    src.add_argument("--adapter", help="peft adapter directory to apply on --model")
    src.add_argument("--quantized", help="exported GPTQ checkpoint directory (runs in pure torch)")
    p.add_argument("--text", help="text file for perplexity")
    p.add_argument("--text-start", type=float, default=0.0,
                   help="start at this fraction of the file (0.9: held-out 10%%)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16, help="number of seq_len windows for perplexity")
    p.add_argument("--task", choices=["synthetic", "none"], default="synthetic", help="also measure task accuracy")
    p.add_argument("--num-val", type=int, default=200, help="held-out synthetic problems")
    p.add_argument("--allow-unsafe-load", action="store_true",
                   help="read a --ckpt that needs full unpickling (it can run code from the file: trusted files "
                        "only; qft's own checkpoints never need it)")


def load_for_eval(args):
    """``(model, tokenizer)`` for ``qft eval`` from the mutually exclusive sources."""
    from . import models

    if args.quantized:
        from .export import load_quantized

        return load_quantized(args.quantized), models.load_tokenizer(args.quantized)
    if args.ckpt:
        from .module import CausalLMModule

        module = CausalLMModule.load_any(args.ckpt, args.allow_unsafe_load, map_location="cpu")
        return module.model, module.tokenizer
    model, tok = models.load(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model, tok


def run_eval(args) -> dict:
    from .evaluate import task_accuracy, text_perplexity

    if args.text is None and args.task == "none":
        raise SystemExit("qft eval: nothing to measure; give --text FILE and/or --task synthetic.")
    model, tok = load_for_eval(args)
    out = {}
    if args.text:
        out["perplexity"] = text_perplexity(model, tok, args.text, seq_len=args.seq_len, max_windows=args.windows,
                                            start_fraction=args.text_start)
    if args.task == "synthetic":
        out["accuracy"] = task_accuracy(model, tok, num_val=args.num_val)
    for k, v in out.items():
        print(f"{k}: {v:.4f}")
    return out


def main(argv: list[str] | None = None) -> None:
    """``qft <command> ...``; ``--verbose`` anywhere keeps the library lines qft silences (qft.console).

    An argument qft refuses ends the command with its one-line message and exit status 2, not a
    traceback (``--verbose`` shows it); library errors and bugs keep their traceback.
    """
    from .console import quiet

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    quiet(verbose)
    try:
        _dispatch(argv)
    except Exception as exc:
        cause = None if verbose else user_error(exc)
        if cause is None:
            raise  # a library error or a bug: the traceback is what helps
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
        print(f"qft {argv[0] if argv else ''}: error: {message}\n(--verbose shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(argv: list[str]) -> None:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv)
        return
    parser = argparse.ArgumentParser(prog="qft", description="Quantization-aware fine-tuning for Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in LIGHTNING_COMMANDS:
        sub.add_parser(c, help=f"LightningCLI {c}: qft {c} --config recipes/X.yaml", add_help=False)
    _eval_parser(sub.add_parser("eval", help="perplexity on a text file and synthetic-task accuracy"))
    exp = sub.add_parser("export", help="merge adapters and quantise with GPTQ into a HF GPTQ checkpoint")
    try:
        from .export.cli import add_arguments
        from .export.cli import run as run_export
    except ImportError:  # export lands in its own package; keep the CLI usable without it
        add_arguments = run_export = None
    if add_arguments is not None:
        add_arguments(exp)
    args = parser.parse_args(argv)
    if args.command == "eval":
        run_eval(args)
    elif args.command == "export":
        if run_export is None:
            raise SystemExit("qft export: the export package is not available in this installation.")
        run_export(args)


if __name__ == "__main__":
    main()
