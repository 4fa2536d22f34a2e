"""What the benchmark scripts share for starting the project's own commands."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil


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


def stop_tree(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a server drains and stops its own children), then SIGKILL whatever of its
    process tree is left after ``timeout_s``."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file (for an error message); "" when it cannot be read."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
