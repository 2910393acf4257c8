"""Training-step cost of qft's labelled-positions-only LM head vs transformers' full-logits loss.

    python benchmarks/selective_logits.py --out selective_logits.json [--model smollm2-135m --steps 6]

Both arms train the same NF4 QLoRA model on the same synthetic-task batches (loss on the answer tokens
only, as instruction tuning does). Each arm runs in its own subprocess so peak RSS is its own; the arms
alternate so machine noise hits both. Reports median step time, peak RSS and their ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def worker(arm: str, model: str, steps: int, batch_size: int) -> dict:
    import torch

    from qft.data.synthetic import addition_splits
    from qft.data.tokenize import chat_example, collate
    from qft.module import CausalLMModule, causal_lm_loss

    torch.manual_seed(0)
    m = CausalLMModule(model=model, quantization="nf4", adapter="lora", lora_r=8, compute_dtype="auto")
    m.configure_model()
    m.train()
    train, _ = addition_splits(batch_size * steps, 1)
    data = [chat_example(m.tokenizer, r["messages"]) for r in train]
    batches = [collate(data[i:i + batch_size], m.tokenizer.pad_token_id) for i in range(0, len(data), batch_size)]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        with m._autocast():
            loss = causal_lm_loss(m.model, b) if arm == "qft" else m.model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {"arm": arm, "step_s": statistics.median(times[1:] or times), "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.steps, a.batch_size)))
        return
    runs = {"hf": [], "qft": []}
    for _ in range(a.rounds):
        for arm in ("hf", "qft"):
            out = subprocess.run([sys.executable, __file__, "--out", a.out, "--worker", arm, "--model", a.model,
                                  "--steps", str(a.steps), "--batch-size", str(a.batch_size)],
                                 capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"model": a.model, "batch_size": a.batch_size, "steps": a.steps, "rounds": a.rounds}
    for arm, rs in runs.items():
        res[f"{arm}_step_s"] = statistics.median(r["step_s"] for r in rs)
        res[f"{arm}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
    res["max_loss_diff"] = max(abs(x - y) for x, y in zip(runs["hf"][0]["losses"], runs["qft"][0]["losses"]))
    res["step_time_ratio_qft_over_hf"] = res["qft_step_s"] / res["hf_step_s"]
    res["peak_rss_ratio_qft_over_hf"] = res["qft_peak_rss_mb"] / res["hf_peak_rss_mb"]
    print(f"{'arm':<6}{'step s':>10}{'peak RSS MB':>14}")
    for arm in ("hf", "qft"):
        print(f"{arm:<6}{res[f'{arm}_step_s']:>10.3f}{res[f'{arm}_peak_rss_mb']:>14.0f}")
    print(f"ratios qft/hf: step {res['step_time_ratio_qft_over_hf']:.2f}, RSS {res['peak_rss_ratio_qft_over_hf']:.2f}; "
          f"max loss diff {res['max_loss_diff']:.2e}")
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
