"""`recsys-serve`: runs the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes (they share one Redis and one item matrix)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Threaded numpy inside a threaded server collapses throughput (GUIDE §3); must be set
    # before numpy is imported, and worker processes inherit it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import uvicorn

    from service.redis_server import EmbeddedRedis

    embedded = None
    if args.workers > 1 and not os.environ.get("RECSYS_REDIS_URL"):
        # Several workers must share one cache: start the private Redis here, not per worker.
        embedded = EmbeddedRedis().start()
        os.environ["RECSYS_REDIS_URL"] = embedded.url
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; exiting through
    # this handler instead makes a graceful stop exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("service.serving.app:app_from_environment", factory=True, host=args.host,
                    port=args.port, workers=args.workers, access_log=False,
                    timeout_graceful_shutdown=30)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
