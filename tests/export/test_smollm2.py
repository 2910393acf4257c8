"""SmolLM2-135M (benchmark-sized; `pytest -m benchmark`): GPTQ beats RTN on WikiText-2 perplexity."""
import copy
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikitext2_test.raw"


@pytest.mark.benchmark
def test_gptq_beats_rtn_on_smollm2():
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (the shared reference data)")
    from qft.export import GPTQConfig, calibration_tokens, quantize_model
    from qft.models import load

    model, tok = load("smollm2-135m", dtype=torch.bfloat16)
    ids = torch.tensor(tok(DATA.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    ev = ids[:2048].reshape(2, 1024)
    calib = calibration_tokens(ids[ids.numel() // 2:], n_samples=16, seq_len=512)

    def ppl(m):
        with torch.inference_mode():
            return float(torch.exp(torch.stack([m(input_ids=b[None], labels=b[None]).loss for b in ev]).mean()))

    fp = ppl(model)
    out = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        quantize_model(m, GPTQConfig(bits=4, group_size=64, method=method), calib, progress=False)
        out[method] = ppl(m)
    assert fp < out["gptq"] < out["rtn"]
