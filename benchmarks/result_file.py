"""How every benchmark writes its JSON result.

Through a temporary sibling and a rename, so a killed benchmark never leaves a half-written result; and
never over an existing file unless the caller was asked to replace it (``--force``/``--overwrite``), so
no recorded figure is lost. If the file appeared while the benchmark ran, this run's result stays in the
temporary file, whose path the error names.

Every result also records the machine it ran on (``machine``: CPU model and the flags that change the
figures: AMX and AVX512-BF16 pick other bf16 kernels, and llama.cpp's AMX backend crashes on some Intel
CPUs), so a figure from one CPU kind is never compared with one from another without saying so.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict:
    """The CPU (model, cores, the flags in ``FLAGS``), the GPU if any, and torch's version."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS}}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(out, res: dict, replace: bool = False) -> Path:
    res = res if "machine_info" in res else {**res, "machine_info": machine()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    except BaseException:
        os.unlink(tmp)
        raise
    if out.exists() and not replace:
        raise SystemExit(f"{out} appeared while the benchmark ran; this run's result is kept in {tmp}.")
    os.replace(tmp, out)
    return out
