"""Where does the int4 export lose accuracy: the merge or the GPTQ solve? Both ``merge_into`` options.

    python benchmarks/merge_into.py RUN/lightning_logs/version_0/adapter [--group-size 64] [--num-val 100]

Takes the peft adapter a ``make demo`` run saved (NF4 QLoRA + PRILoRA on the synthetic addition task),
and for ``merge_into`` = ``original`` (the fp base as released; the default) and ``dequantized_nf4`` (the
base the adapter was trained on) prints the exact-match accuracy on the demo's held-out additions of:
the merged fp32 model, and its GPTQ int4 export (64 x 64 calibration tokens from the task, as the demo).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--num-val", type=int, default=100)
    a = ap.parse_args()

    from qft.data import QFTDataModule
    from qft.evaluate import task_accuracy
    from qft.export import GPTQConfig, load_quantized
    from qft.export.calibration import calibration_tokens
    from qft.export.cli import _from_adapter
    from qft.export.pipeline import export, merged_model

    work = Path(tempfile.mkdtemp(prefix="merge-into-"))
    for merge_into in ("original", "dequantized_nf4"):
        trained, tok, base, _ = _from_adapter(a.adapter, "smollm2-135m", merge_into)
        if merge_into == "dequantized_nf4":  # the model as trained: NF4 base + adapter
            print(f"trained NF4 + adapter: {task_accuracy(trained, tok, num_val=a.num_val):.1%}", flush=True)
        acc_fp = task_accuracy(merged_model(trained, base, merge_into), tok, num_val=a.num_val)
        data = QFTDataModule(task="synthetic", batch_size=16, num_train=2560, num_val=a.num_val, seq_len=64)
        out = work / merge_into
        export(trained, tok, calibration_tokens(data, tok, 64, 64), out, GPTQConfig(bits=4, group_size=a.group_size),
               base_name=base, merge_into=merge_into, progress=False)
        acc_q = task_accuracy(load_quantized(out), tok, num_val=a.num_val)
        print(f"merge_into={merge_into}: merged fp32 {acc_fp:.1%}, GPTQ int4 g{a.group_size} {acc_q:.1%}", flush=True)


if __name__ == "__main__":
    main()
