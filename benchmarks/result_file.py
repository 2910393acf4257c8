"""How every benchmark writes its JSON result.

Through a temporary sibling and a rename, so a killed benchmark never leaves a half-written result; and
never over an existing file unless the caller was asked to replace it (``--force``/``--overwrite``), so
no recorded figure is lost. If the file appeared while the benchmark ran, this run's result stays in the
temporary file, whose path the error names.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_result(out, res: dict, replace: bool = False) -> Path:
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
