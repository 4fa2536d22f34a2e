"""Memory across hot reloads: RSS after each of N reloads of an exported version.

    .venv/bin/python bench/reload_memory.py model_store/default/1 [--reloads 10]

The version is copied to 2, 3, ... (as an exporter would: hidden temp dir, then rename) and
POST /v1/admin/reload is called after each copy, with a few requests in between. Prints RSS (MB)
after each load and the growth of the last over the first. Uses a private Redis.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil
from fastapi.testclient import TestClient

from service.redis_server import EmbeddedRedis
from service.serving.app import create_app
from service.settings import Settings


def add_version(source: Path, model_dir: Path, number: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    tmp.rename(model_dir / str(number))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--reloads", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as redis:
        model_dir = Path(tmp) / "default"
        model_dir.mkdir()
        add_version(args.version_dir, model_dir, 1)
        app = create_app(Settings(model_store=Path(tmp), redis_url=redis.url, poll_interval_s=0))
        process = psutil.Process()
        rss: list[float] = []
        with TestClient(app) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.1)
            for number in range(2, args.reloads + 3):
                add_version(args.version_dir, model_dir, number)
                answer = client.post("/v1/admin/reload").json()
                assert answer["model"]["version"] == number, answer
                for _ in range(20):
                    client.post("/v1/recommend", json={"k": 10})
                rss.append(process.memory_info().rss / 1e6)
        print("RSS MB after each load:", " ".join(f"{x:.0f}" for x in rss))
        print(f"after {args.reloads} reloads: {100 * (rss[-1] / rss[0] - 1):+.1f}% vs the first")


if __name__ == "__main__":
    main()
