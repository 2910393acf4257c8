"""The GGUF container for a Llama-architecture model: names, hyper-parameters, tokenizer, atomic write.

The ``gguf`` package (llama.cpp's own gguf-py) does the container: ``GGUFWriter`` lays out the header,
key-values and aligned tensor data, and ``get_tensor_name_map`` maps Hugging Face parameter names to
llama.cpp's (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``). What is left
here is what llama.cpp's converter does for Llama models: the rotary row order of ``attn_q`` and
``attn_k`` and the metadata keys llama.cpp reads.

The file is written under a hidden temporary name beside the target and renamed into place; an
existing file is replaced only when asked.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import work_dir

TOKENIZER_PREFIX = "tokenizer."
SUPPORTED_ARCHES = ("LlamaForCausalLM",)


def check_architecture(model) -> None:
    arches = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if not set(arches) & set(SUPPORTED_ARCHES):
        raise ValueError(f"GGUF export: model architecture {arches} is not supported; allowed: "
                         f"{list(SUPPORTED_ARCHES)} (Llama-style: SmolLM2, Llama, TinyLlama). Export it as GPTQ "
                         "(qft export --format gptq) instead.")


def rotary_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order llama.cpp expects for ``attn_q``/``attn_k``: Hugging Face keeps each head's rotary
    pairs as two halves, GGML interleaves them. ``W_gguf = W_hf[rotary_rows(...)]``."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).view(n_heads, 2, half).transpose(1, 2).reshape(-1)


def gguf_name(hf_name: str, n_blocks: int) -> str:
    import gguf

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"GGUF export: no llama.cpp name for parameter {hf_name!r}.")
    return name


def hyperparameters(writer, config, file_type: int, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def copy_tokenizer(writer, source: Path) -> None:
    """Every ``tokenizer.*`` key of another GGUF file (the one the model came from), verbatim."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)


def tokenizer_from_hf(writer, tokenizer, pre: str) -> None:
    """A GPT-2-style BPE tokenizer's vocabulary, merges, special ids and chat template."""
    import json

    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export: the tokenizer is {spec['model']['type']}, not byte-level BPE; only BPE "
                         "tokenizers are written from Hugging Face files.")
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = (gguf.TokenType.CONTROL if special[tok] else gguf.TokenType.USER_DEFINED) if tok in special \
            else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, tok in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unk", tokenizer.unk_token),
                      ("pad", tokenizer.pad_token)):
        if tok is not None and tok in vocab:
            getattr(writer, {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(what, f"add_{what}_token_id"))(
                vocab[tok])
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def check_output_file(path, overwrite: bool = False) -> Path:
    out = Path(path)
    if out.suffix != ".gguf":
        raise ValueError(f"GGUF export: output={str(out)!r} should end in .gguf (llama.cpp and Ollama look for "
                         "it); e.g. runs/model-Q4_K_M.gguf.")
    if out.is_dir():
        raise IsADirectoryError(f"GGUF export: output={str(out)!r} is a directory; give a file name ending in .gguf.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"GGUF export: output={str(out)!r} already exists; pass overwrite=True (CLI: "
                              "--overwrite) to replace it, or choose a new name.")
    return out


def write_gguf(path, tensors: list[tuple[str, np.ndarray, object]], fill_metadata, overwrite: bool = False,
               verify=None) -> Path:
    """Write ``tensors`` (gguf name, data, ``GGMLQuantizationType`` or None for a plain float array) and
    the metadata that ``fill_metadata(writer)`` adds, atomically, to ``path``. ``verify(tmp_file)``: the last
    check before the rename (``qft.export.verify``); what it raises stops the export."""
    import shutil

    import gguf

    out = check_output_file(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = work_dir(out, "tmp")
    tmp = tmp_dir / out.name
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        fill_metadata(writer)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        if out.exists() and not overwrite:
            raise FileExistsError(f"GGUF export: output={str(out)!r} appeared during the export; not overwriting it.")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
