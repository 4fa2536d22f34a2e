"""`recsys-serve`: runs the HTTP service with uvicorn.

With ``--workers N`` (N > 1) it starts N server processes that each bind the port with
SO_REUSEPORT, so the kernel spreads connections evenly over them (uvicorn's own workers share
one listening socket, and a burst of connections piles onto one of them), and supervises them:
a worker that dies is restarted, SIGTERM/SIGINT are passed on and drained.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

log = logging.getLogger("service.serving.cli")

APP = "service.serving.app:app_from_environment"
YOUNG_COLLECTION_EVERY = 10_000  # allocations
DRAIN_TIMEOUT_S = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (they share one Redis and one item matrix)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Threaded numpy inside a threaded server collapses throughput (GUIDE §3); must be set
    # before numpy is imported, and worker processes inherit it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # TensorFlow's thread pools likewise: every core already runs a worker's event loop or
    # batch thread (32 connections on 2 workers, three alternations each: 1,168-1,228 ->
    # 1,269-1,304 req/s, 7% less CPU per request; the item matrix was no slower to compute).
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Arrow's own mimalloc pool kept about 55 MB of a million items' freed columns resident
    # after release_unused(); malloc's are handed back by release_memory's malloc_trim
    # (1M items, peak RSS 1,227 / 1,237 -> 1,191 / 1,188 MB, p50 unchanged; BENCHMARKS.md).
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    problem = configuration_problem()
    if problem:
        print(f"recsys-serve: invalid configuration: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return supervise(args.host, args.port, args.workers)
    return serve(args.host, args.port, args.reuse_port)


def configuration_problem() -> str | None:
    """What is wrong with the RECSYS_* environment, checked before any server starts (inside
    uvicorn's app factory it would surface as a traceback)."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        Settings()
    except ValidationError as exc:
        return "; ".join(f"RECSYS_{str(e['loc'][0]).upper()}: {e['msg']}" if e["loc"]
                         else e["msg"] for e in exc.errors())
    return None


class LeaveOut(importlib.abc.MetaPathFinder):
    """Keeps libraries that the server never uses out of its process, where other libraries
    import them only for integrations they skip when the import fails:

    - Keras: `import tensorflow` imports its optimizers eagerly (so that Keras SavedModels can
      restore them). The service loads tf.Module exports only. About 500 modules and 100 to
      200 MB of RSS (measured: `import tensorflow` 785 -> 583 MB, the whole app 814 -> 707 MB).
    - pandas: pyarrow imports it on the first `pa.array` call (to recognise its Series). About
      430 modules and 50 MB of RSS (BENCHMARKS.md).
    """

    PACKAGES = ("keras.src", "pandas")

    def __init__(self) -> None:
        # One already imported (a test's process, say) stays usable.
        self.packages = tuple(p for p in self.PACKAGES if p not in sys.modules)

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        for package in self.packages:
            if name == package or name.startswith(package + "."):
                raise ImportError(f"{name}: not used by the server process")
        return None


def serve(host: str, port: int, reuse_port: bool) -> int:
    """One server process. Exits 0 after a graceful stop (SIGTERM drains in-flight requests)."""
    import uvicorn

    sys.meta_path.insert(0, LeaveOut())

    # Python's default runs a young collection every 700 net allocations, here about every 9
    # requests: at 10,000, 32 connections got about 6% more throughput (BENCHMARKS.md).
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
    config = uvicorn.Config(APP, factory=True, host=host, port=port, access_log=False,
                            timeout_graceful_shutdown=DRAIN_TIMEOUT_S)
    # uvicorn drains on SIGTERM, then re-raises the signal; exiting through this handler
    # instead makes a graceful stop exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.Server(config).run(sockets=[shared_socket(host, port)] if reuse_port else None)
    return 0


def shared_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(host: str, port: int, workers: int) -> int:
    """Starts the workers, restarts any that dies, passes stop signals on and waits."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from prometheus_client.multiprocess import mark_process_dead

    from service.redis_server import EmbeddedRedis

    embedded = None
    if not os.environ.get("RECSYS_REDIS_URL"):
        # The workers must share one cache: one private Redis for all of them.
        embedded = EmbeddedRedis().start()
        os.environ["RECSYS_REDIS_URL"] = embedded.url
    # Workers write their metrics here so that any of them can answer for all (metrics.py).
    metrics_dir = tempfile.TemporaryDirectory(prefix="recsys-metrics-")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir.name)
    command = [sys.executable, "-m", "service.serving.cli", "--host", host, "--port",
               str(port), "--reuse-port"]
    stopping = False
    children: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children.extend(subprocess.Popen(command) for _ in range(workers))
    log.info("started %d workers on %s:%d: %s", workers, host, port,
             [c.pid for c in children])
    try:
        while not stopping:
            for n, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    log.error("worker %d exited with %s; restarting it", child.pid,
                              child.returncode)
                    mark_process_dead(child.pid)
                    children[n] = subprocess.Popen(command)
            time.sleep(0.2)
        return wait_all(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if embedded is not None:
            embedded.stop()
        metrics_dir.cleanup()


def wait_all(children: list[subprocess.Popen[bytes]]) -> int:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S + 5
    codes = []
    for child in children:
        try:
            codes.append(child.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
