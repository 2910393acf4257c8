"""GGUF export: llama.cpp's mixes, the file read back by gguf-py and transformers (llama.cpp itself
reads it in test_gguf_llamacpp.py), GPTQ inside a block grid, the CLI and the refusals."""
from __future__ import annotations

import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

from qft.export.gguf import GGUFConfig, export_gguf, load_gguf  # noqa: E402
from qft.export.gguf.mix import tensor_types, use_more_bits  # noqa: E402

X = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))


def _smollm2_shapes():
    out = [("token_embd.weight", (49152, 576))]
    for i in range(30):
        out += [(f"blk.{i}.attn_q.weight", (576, 576)), (f"blk.{i}.attn_k.weight", (192, 576)),
                (f"blk.{i}.attn_v.weight", (192, 576)), (f"blk.{i}.attn_output.weight", (576, 576)),
                (f"blk.{i}.ffn_gate.weight", (1536, 576)), (f"blk.{i}.ffn_up.weight", (1536, 576)),
                (f"blk.{i}.ffn_down.weight", (576, 1536)), (f"blk.{i}.attn_norm.weight", (576,)),
                (f"blk.{i}.ffn_norm.weight", (576,))]
    return out + [("output_norm.weight", (576,))]


def test_q4_k_m_mix_is_llama_cpps_for_smollm2():
    """The formats llama-quantize 0.3.36 reports for SmolLM2-135M Q4_K_M (its 576-wide rows fall back
    from Q4_K to Q5_0 and from Q6_K to Q8_0; 1536-wide ffn_down keeps k-quants)."""
    t = tensor_types("Q4_K_M", _smollm2_shapes())
    assert t["token_embd.weight"] == "Q8_0"  # tied: the output's rule, Q6_K -> Q8_0 on 576-wide rows
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert t[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")
        assert t[f"blk.{i}.attn_q.weight"] == t[f"blk.{i}.ffn_up.weight"] == "Q5_0"
        assert t[f"blk.{i}.attn_norm.weight"] == "F32"
    assert set(tensor_types("Q4_0", _smollm2_shapes()).values()) == {"Q4_0", "Q8_0", "F32"}
    assert set(tensor_types("Q6_K", _smollm2_shapes()).values()) == {"Q6_K", "Q8_0", "F32"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_written_file_reads_back_as_the_model_qft_quantized(tmp_path, tiny, calib_tokens, method):
    """gguf-py's tensors, un-permuted by transformers' GGUF loader, equal the weights qft left in the
    model; the tokenizer keys, hyper-parameters and the rotary row order are what llama.cpp reads."""
    out = tmp_path / "m.gguf"
    s = export_gguf(tiny, None, calib_tokens[:8], out, GGUFConfig(quant="Q4_K_M", method=method),
                    source_gguf=_source(), progress=False)
    assert s["formats"] == {"Q8_0": 3, "Q4_K": 2, "Q6_K": 2, "Q5_0": 22, "F32": 9} and out.is_file()
    back = load_gguf(out)
    mine = dict(tiny.named_parameters())
    for name, p in back.named_parameters():
        if "layers" in name and name.endswith("proj.weight"):
            torch.testing.assert_close(p, mine[name], rtol=1e-6, atol=1e-6)
    emb = back.model.embed_tokens.weight
    assert 0 < float((emb - tiny.model.embed_tokens.weight).abs().max()) < 5e-3  # Q8_0, not a copy
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["general.file_type"].contents() == 15


def test_gptq_inside_the_grid_beats_its_own_rounding(tmp_path, tiny, calib_tokens):
    """Same grids, same calibration: GPTQ's codes give a smaller output error than the imatrix grid's
    own rounding, layer by layer on average and on the model's logits."""
    import copy

    ref = _logits(tiny)
    errs = {}
    for method in ("imatrix", "gptq"):
        m = copy.deepcopy(tiny)
        s = export_gguf(m, None, calib_tokens, tmp_path / f"{method}.gguf", GGUFConfig(quant="Q4_0", method=method),
                        source_gguf=_source(), progress=False)
        errs[method] = (sum(r["rel_output_error"] for r in s["layers"]) / len(s["layers"]),
                        float((_logits(load_gguf(tmp_path / f"{method}.gguf")) - ref).square().mean()))
    assert errs["gptq"][0] < 0.9 * errs["imatrix"][0], errs
    assert errs["gptq"][1] < errs["imatrix"][1], errs


def test_offset_grid_solve_stays_on_the_grid():
    """A Q4_K grid has a zero point off the integers (scale * q - offset): GPTQ rounds inside it."""
    from qft.export.config import GPTQConfig
    from qft.export.gptq import gptq_solve
    from qft.quant.ggml import quantize

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 256, generator=g) * 0.05
    X = (torch.randn(1024, 48, generator=g) @ torch.randn(48, 256, generator=g)
         + 0.1 * torch.randn(1024, 256, generator=g))
    H = X.t() @ X / 1024  # correlated inputs, as a layer's are: what GPTQ's compensation uses
    codes, grid = quantize(W, "Q4_K", torch.diag(H))
    rtn = grid.quantized(codes)
    assert not torch.equal(rtn.zero, rtn.zero.round())
    qw = gptq_solve(W, H, GPTQConfig(bits=4, group_size=32), grid=rtn)
    assert qw.bits == 4 and qw.group_size == 32
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 15
    torch.testing.assert_close(qw.scale, rtn.scale)
    torch.testing.assert_close(qw.zero, rtn.zero)

    def out_err(Q):
        D = W - Q
        return float(((D @ H) * D).sum())

    assert out_err(qw.dequantize()) < 0.8 * out_err(rtn.dequantize())


def test_bad_input_is_refused_before_any_work(tmp_path, tiny, calib_tokens):
    with pytest.raises(ValueError, match=r"quant='Q3_K_X'.*allowed"):
        GGUFConfig(quant="Q3_K_X")
    with pytest.raises(ValueError, match="method='awq'"):
        GGUFConfig(method="awq")
    with pytest.raises(ValueError, match="end in .gguf"):
        export_gguf(tiny, None, calib_tokens, tmp_path / "m.bin", GGUFConfig(method="rtn"), progress=False)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        export_gguf(tiny, None, None, tmp_path / "m.gguf", GGUFConfig(method="gptq"), source_gguf=_source(),
                    progress=False)
    (tmp_path / "old.gguf").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(tiny, None, None, tmp_path / "old.gguf", GGUFConfig(method="rtn"), progress=False)
    assert (tmp_path / "old.gguf").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="needs the tokenizer"):
        export_gguf(tiny, None, None, tmp_path / "m.gguf", GGUFConfig(method="rtn"), progress=False)
    tiny.config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="not supported"):
        export_gguf(tiny, None, None, tmp_path / "m.gguf", GGUFConfig(method="rtn"), progress=False)
    assert not list(tmp_path.glob(".m.gguf*")) and not (tmp_path / "m.gguf").exists()


def test_cli_writes_gguf_from_an_adapter_and_refuses_gptq_flags(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from qft.export.cli import main
    from qft.models import load_model

    adapter = tmp_path / "adapter"
    torch.manual_seed(0)  # the adapter's random init
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="--quant applies to --format gguf"):
        main(["--adapter", str(adapter), "--output", str(tmp_path / "x"), "--quant", "Q4_0"])
    with pytest.raises(ValueError, match="cannot take --bits"):
        main(["--adapter", str(adapter), "--output", str(out), "--format", "gguf", "--bits", "4"])
    with pytest.raises(Exception, match="--calibration is required"):
        main(["--adapter", str(adapter), "--output", str(out), "--format", "gguf"])
    s = main(["--adapter", str(adapter), "--output", str(out), "--format", "gguf", "--quant", "Q4_0",
              "--method", "rtn"])
    assert s["formats"]["Q4_0"] == 28 and out.is_file()
    merged = dict(model.merge_and_unload().named_parameters())
    back = dict(load_gguf(out).named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.v_proj.weight"):
        W, Q = merged[name], back[name]  # the merged adapter, 4-bit: within Q4_0's rounding of it
        assert float((Q - W).square().sum() / W.square().sum()) < 0.02, name


def _source():
    from qft.models import source_gguf

    return source_gguf("tiny-llama")


def _logits(model):
    with torch.no_grad():
        return model(X).logits.float()


def _fit(tmp_path, module, callbacks, steps=3):
    import pytorch_lightning as pl

    from qft.data import QFTDataModule

    dm = QFTDataModule(task="synthetic", seq_len=64, batch_size=4, num_train=16, num_val=4)
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(module, datamodule=dm)


def test_callback_keeps_a_q4_0_grid_qat_learned_bit_for_bit(tmp_path, calib_text):
    """QAT on int4, group 32, symmetric is GGUF's Q4_0: the callback writes the learned codes and
    scales, so llama.cpp's weights are the fake-quant model's, bit for bit; another mix is refused at
    set-up (before step 0, nothing written) unless qat_grid='resolve'."""
    from qft import layers
    from qft.export.gguf.callback import GGUFExportCallback
    from qft.module import CausalLMModule
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    def qat():
        return QATCallback(weight=QuantScheme(bits=4, group_size=32), start_step=0)

    module = CausalLMModule(model="tiny-llama", adapter="none", lr=1e-3)
    bad = GGUFExportCallback(tmp_path / "km.gguf", quant="Q4_K_M", calibration=calib_text, progress=False)
    with pytest.raises(ValueError, match="QuantScheme.bits=4, group_size=32. for Q4_0"):
        _fit(tmp_path, module, [qat(), bad])
    assert not (tmp_path / "km.gguf").exists() and module.global_step == 0

    module = CausalLMModule(model="tiny-llama", adapter="none", lr=1e-3)
    cb = GGUFExportCallback(tmp_path / "q40.gguf", quant="Q4_0", calibration=None, progress=False)
    _fit(tmp_path, module, [qat(), cb])
    assert cb.tokens is None and cb.summary["formats"]["Q4_0"] == 28  # nothing calibrated: the grid is kept
    learned = layers.grids(module.model)
    back = dict(load_gguf(cb.checkpoint_path).named_parameters())
    for name, qw in learned.items():
        assert torch.equal(back[name + ".weight"], qw.dequantize()), name

    module = CausalLMModule(model="tiny-llama", adapter="none", lr=1e-3)
    cb = GGUFExportCallback(tmp_path / "resolved.gguf", quant="Q4_K_M", qat_grid="resolve", calibration=calib_text,
                            n_samples=4, seq_len=32, progress=False)
    _fit(tmp_path, module, [qat(), cb], steps=1)
    assert cb.summary["qat_grid"] == "resolve" and (tmp_path / "resolved.gguf").is_file()


def test_a_gptq_and_two_gguf_exports_share_one_fit_and_all_resume(tmp_path):
    """Export callbacks in one Trainer, two of them of one kind: each writes its file, each checkpoints
    under its own key (built from its output, not its class), and a run resumed from the checkpoint gives
    each its own state back."""
    import pytorch_lightning as pl

    from qft.data import QFTDataModule
    from qft.export.callback import GPTQExportCallback
    from qft.export.gguf.callback import GGUFExportCallback
    from qft.module import CausalLMModule
    from qft.qat import QATCallback
    from qft.quant import QuantScheme

    def callbacks(overwrite=False):
        return [QATCallback(weight=QuantScheme(bits=4, group_size=32), start_step=0),
                GPTQExportCallback(tmp_path / "int4", qat_grid="keep", calibration=None, progress=False,
                                   overwrite=overwrite),
                *(GGUFExportCallback(tmp_path / name, quant="Q4_0", calibration=None, progress=False,
                                     overwrite=overwrite) for name in ("q40.gguf", "copy.gguf"))]

    def trainer(cbs):
        return pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=cbs,
                          default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)

    def data():
        return QFTDataModule(task="synthetic", seq_len=64, batch_size=4, num_train=16, num_val=4)

    first = callbacks()
    t = trainer(first)
    t.fit(CausalLMModule(model="tiny-llama", adapter="none", lr=1e-3), datamodule=data())
    exports = first[1:]
    assert (tmp_path / "int4" / "model.safetensors").is_file()
    assert (tmp_path / "q40.gguf").is_file() and (tmp_path / "copy.gguf").is_file()
    assert len({cb.state_key for cb in exports}) == 3
    ckpt = tmp_path / "end.ckpt"
    t.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    paths = [states[cb.state_key]["checkpoint_path"] for cb in exports]
    assert paths == [cb.checkpoint_path for cb in exports] and len(set(paths)) == 3

    restored = {}

    class _Seen(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # after the checkpoint's callback states are loaded
            restored["paths"] = [cb.checkpoint_path for cb in again[1:4]]

    again = callbacks(overwrite=True)
    trainer([*again, _Seen()]).fit(CausalLMModule(model="tiny-llama", adapter="none", lr=1e-3),
                                   datamodule=data(), ckpt_path=str(ckpt))
    assert restored["paths"] == paths
