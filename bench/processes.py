"""What the benchmark scripts share for starting the project's own commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def executable(name: str, module: str) -> list[str]:
    """The console script next to this interpreter, else `python -m module`."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def clean_env(**extra: str) -> dict[str, str]:
    """The inherited environment without any RECSYS_* setting (a caller's API key, store,
    Redis...), single-threaded BLAS as in production, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.update(extra)
    return env
