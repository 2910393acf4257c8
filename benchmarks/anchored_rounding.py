"""Where the anchored export loses task accuracy: the blend, or its rounding.

    python benchmarks/anchored_rounding.py --fit runs/demo-XXXX --steps 120 --out rounding.json \
        [--rows adapters,keep,blend,refine] [--num-answers 1000]

``--fit`` is a directory holding a saved quantization-aware QLoRA fit (``make demo``'s run directory, or
``export_roads.py``'s ``qa_qlora`` work directory); ``--steps`` its length (to rebuild its training split,
whose problems are dropped from the held-out ones). Each row exports the fit in memory (int4, the grid QAT
learned, 64 x 64 calibration windows with a quarter from the second half of WikiText-2 test, general
text anchored to the released base) and measures it:

- ``adapters``: the QLoRA adapters on NF4, fake-quant off (the demo's ``acc_qlora``);
- ``keep``: the learned grid as is (bit-exact to the model as trained, fake-quant on);
- ``blend``: the anchored blend ``W*`` itself, not rounded (a diagnostic: no checkpoint can hold it);
- ``refine``: the default road, ``W*`` rounded by GPTQ on the learned scales.

Figures: greedy exact match on the 100 held-out problems ``make demo`` uses; teacher-forced exact match
and answer NLL on ``--num-answers`` held-out problems (``qft.evaluate.answer_accuracy``, bf16 autocast);
WikiText-2 perplexity on the first 16 x 1024 test tokens (bf16 autocast).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Exact:
    """Stands in for a solved grid where the blend is kept unrounded (the ``blend`` row)."""

    def __init__(self, W):
        self.W, self.loss, self.damp_percent, self.rel_error = W, 0.0, 0.0, 0.0

    def rows(self, a, b):
        return _Exact(self.W[a:b])

    def dequantize(self):
        return self.W

    def cpu(self):
        return self


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="adapters,keep,blend,refine")
    ap.add_argument("--num-answers", type=int, default=1000)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    torch.set_num_threads(2)

    from qft import layers, models
    from qft.data import QFTDataModule
    from qft.data.synthetic import _pairs
    from qft.demo import wikitext
    from qft.evaluate import answer_accuracy, perplexity, task_accuracy
    from qft.export import GPTQConfig, calibration_mix, sequential
    from qft.export.merge import merge_adapters
    from qft.export.pipeline import base_weights
    from qft.module import CausalLMModule

    ckpt = sorted(Path(a.fit).glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    if not ckpt:
        sys.exit(f"--fit {a.fit}: no lightning_logs/version_*/checkpoints/*.ckpt there")
    trained = CausalLMModule.load_any(str(ckpt[-1])).model.eval()
    tok = models.load_tokenizer(a.model)
    wiki_eval, wiki_calib = wikitext(tok)
    if wiki_eval is None:
        sys.exit("needs ../shared/data/wikitext2_test.raw")
    data = QFTDataModule(task="synthetic", batch_size=16, num_train=a.steps * 16, num_val=100, seq_len=64)
    seen = _pairs(a.steps * 16, 0, exclude=set(_pairs(100, 1_000_003)))  # the fit's training problems
    calib = calibration_mix(data, wiki_calib, tok, 64, 64, 0.25)
    anchor, fixed = base_weights(a.model), layers.grids(layers.unwrap(trained))
    result = {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "checkpoint": str(ckpt[-1]), "rows": []}

    def measure(name, model, ppl=True, **extra):
        t = time.perf_counter()
        r = {"row": name, **extra, "acc_100": task_accuracy(model, tok, num_val=100)}
        ans = answer_accuracy(model, tok, num_val=a.num_answers, dtype=torch.bfloat16, exclude=seen)
        r.update(answer_acc=ans["acc"], answer_nll=round(ans["nll"], 4), n_answers=ans["n"])
        if ppl:
            r["wikitext_ppl"] = round(perplexity(model, wiki_eval, 1024, 16, dtype=torch.bfloat16), 2)
        r["eval_s"] = round(time.perf_counter() - t, 1)
        result["rows"].append(r)
        print(json.dumps(r), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")

    def exported(rounded=True):
        model = merge_adapters(trained, a.model, merge_into="trained").to(torch.bfloat16)
        solve = sequential.gptq_solve
        if not rounded:
            sequential.gptq_solve = lambda W, H, cfg, report_error=False, grid=None: _Exact(W.float())
        try:
            sequential.quantize_model(model, GPTQConfig(bits=4, group_size=64), calib,
                                      fixed=fixed, refine=True, anchor=anchor, anchor_rows=16, progress=False)
        finally:
            sequential.gptq_solve = solve
        return model.float()

    for row in a.rows.split(","):
        if row == "adapters":
            with layers.fake_quant_disabled(trained):
                measure("adapters (fake-quant off)", trained, ppl=False)
        elif row == "keep":
            measure("keep (as trained)", trained)
        elif row == "blend":
            measure("blend, unrounded", exported(rounded=False))
        elif row == "refine":
            measure("refine (the default road)", exported())
        else:
            sys.exit(f"--rows: unknown row {row!r}; allowed: adapters, keep, blend, refine")


if __name__ == "__main__":
    main()
