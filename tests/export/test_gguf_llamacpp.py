"""llama.cpp reads what qft writes: the GGUF loads in llama-cpp-python, its logits match qft's
dequantized reference, it generates, and llama.cpp's own quantizer (the benchmark's anchor) reads
qft's F32 file and writes the same mix at the same size. Runs in ``.venv-gguf`` (``make test-gguf``)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-gguf` builds "
                                                    "it into .venv-gguf and runs these tests there")

from qft.export.gguf import GGUFConfig, export_gguf, load_gguf  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smollm2():
    from qft.models import load, source_gguf

    model, tok = load("smollm2-135m")
    return model, tok, source_gguf("smollm2-135m")


def _llama(path, n_ctx=128):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _compare(path, tok, reference):
    """``(llm, rms, max, top1)``: llama.cpp's logits against the reference's over every prompt position,
    the differences relative to the reference logits' spread."""
    llm = _llama(path)
    theirs, ours = [], []
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        theirs.append(_llama_logits(llm, ids))
        with torch.no_grad():
            ours.append(reference(torch.tensor([ids])).logits[0].float())
    a, b = torch.cat(theirs), torch.cat(ours)
    d = (a - b) / b.std()
    return (llm, float(d.square().mean().sqrt()), float(d.abs().max()),
            float((a.argmax(-1) == b.argmax(-1)).float().mean()))


def test_the_runtime_is_built_without_amx():
    """llama.cpp's AMX backend segfaults on some Intel Sapphire Rapids CPUs (llama.cpp #20824); `make gguf`
    builds it portable (no -march=native, AMX off), on whichever CPU this machine has: a version bump that
    brought AMX back fails here, not in a segfault on the next Intel machine."""
    import platform

    info = llama_cpp.llama_print_system_info().decode()
    flags = dict(part.strip().split(" = ") for part in info.replace("|", "\n").splitlines() if " = " in part)
    assert flags, info  # the format was read: a change to it must not pass silently
    amx = {k: v for k, v in flags.items() if "AMX" in k.upper() and v.strip() != "0"}
    assert not amx, f"llama.cpp was built with AMX ({amx}); build it with `make gguf` (portable CMAKE_ARGS): {info}"
    if platform.machine() == "x86_64":
        assert flags.get("AVX2") == "1", info  # the baseline the portable build targets


def test_f32_file_computes_what_the_model_computes(tmp_path, smollm2):
    """Unquantized, llama.cpp's logits are the model's to fp32 accumulation order: the names, the
    rotary row order of q/k and every hyper-parameter are right."""
    model, tok, source = smollm2
    out = tmp_path / "f32.gguf"
    export_gguf(model, tok, None, out, GGUFConfig(quant="F32"), source_gguf=source, progress=False)
    _, rms, worst, top1 = _compare(out, tok, model)
    assert rms < 2e-3 and worst < 1e-2 and top1 == 1.0, (rms, worst, top1)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0"])
def test_quantized_file_loads_generates_and_matches_the_reference(tmp_path, smollm2, quant):
    """A qft Q4_K_M/Q4_0 file in llama.cpp: logits within llama.cpp's own activation rounding of
    gguf-py's dequantized weights (read back by transformers), mostly the same next tokens, and text."""
    model, tok, source = smollm2
    out = tmp_path / f"{quant}.gguf"
    calib = tok(" ".join(PROMPTS * 40), return_tensors="pt").input_ids[:, :512]
    export_gguf(copy.deepcopy(model), tok, calib, out, GGUFConfig(quant=quant), source_gguf=source, progress=False)
    llm, rms, worst, top1 = _compare(out, tok, load_gguf(out))
    # llama.cpp rounds activations to 8 bits for quantized matmuls: measured on SmolLM2, its Q8_0 logits
    # differ from exact dequantized-weight math by 2.7% rms (Q4_0 2.9%, Q4_K_M 4.2%), top-1 97-98% the same
    assert rms < 0.08 and top1 >= 0.85, (rms, worst, top1)
    text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert "Paris" in text, text


def test_llama_cpp_quantizer_reads_qft_f32_and_writes_the_same_mix(tmp_path, smollm2):
    """The benchmark's anchor: llama_model_quantize on qft's F32 file, same file size as qft's own."""
    model, tok, source = smollm2
    f32, theirs, ours = tmp_path / "f32.gguf", tmp_path / "lc.gguf", tmp_path / "qft.gguf"
    export_gguf(model, tok, None, f32, GGUFConfig(quant="F32"), source_gguf=source, progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), llama_cpp.byref(params)) == 0
    export_gguf(copy.deepcopy(model), tok, None, ours, GGUFConfig(quant="Q4_K_M", method="rtn"), source_gguf=source,
                progress=False)
    import gguf

    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(theirs)).tensors}
    assert kinds == {t.name: t.tensor_type for t in gguf.GGUFReader(str(ours)).tensors}
    assert ours.stat().st_size == theirs.stat().st_size
