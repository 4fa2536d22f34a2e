"""Two real `recsys-serve` processes on one Redis: one computes the item matrix, the other reads
it; both answer identically; both stop cleanly on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.redis_server import free_port

from .helpers import (
    Server,
    item_matrix_loads,
    metric_samples,
    serve_command,
    start_server,
    unique_prefix,
    wait_ready,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESS_DB = 5  # a database of the private Redis that no other test uses
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@pytest.fixture
def servers(tmp_path: Path, model_store: Path, redis_url: str) -> Iterator[list[Server]]:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    url = f"{redis_url.rsplit('/', 1)[0]}/{PROCESS_DB}"
    flush = redis.Redis.from_url(url)
    flush.flushdb()
    flush.close()
    env = {**os.environ, "RECSYS_MODEL_STORE": str(store), "RECSYS_REDIS_URL": url,
           "RECSYS_REDIS_PREFIX": unique_prefix("proc"), "RECSYS_POLL_INTERVAL_S": "0",
           "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "RECSYS_LOG_LEVEL": "INFO"}
    env.pop("RECSYS_API_KEY", None)
    started: list[Server] = []
    try:
        for n in range(2):
            port = free_port()
            log_path = tmp_path / f"server{n}.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(serve_command(port), cwd=REPO_ROOT, env=env,
                                           stdout=log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            started.append(Server(port, process, log_path))
        yield started
    finally:
        for server in started:
            server.http.close()
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(timeout=10)


@pytest.mark.timeout(240)
def test_two_processes_share_one_item_matrix(servers: list[Server]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for server in servers:
        try:
            wait_ready(server.http, max(1.0, deadline - time.monotonic()))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nexit code {server.process.poll()}; log:\n"
                                 f"{server.log()}") from None

    loads = [item_matrix_loads(server.get("/metrics").text) for server in servers]
    assert sum(load.get("computed", 0.0) for load in loads) == 1.0, loads
    assert sum(load.get("redis", 0.0) for load in loads) == 1.0, loads
    assert all(sum(load.values()) == 1.0 for load in loads), loads

    versions = {server.post("/v1/admin/reload", {})["model"]["version"] for server in servers}
    assert versions == {1}
    items = [f"i{n}" for n in range(1, 151, 7)] + ["unknown"]
    for user in ({"id": "u1"}, {"id": "u250"}, {}, {"features": {"gender": "X", "age": 30}}):
        recommended = [server.post("/v1/recommend", {"user": user, "k": 15})
                       for server in servers]
        assert recommended[0] == recommended[1]
        assert len(recommended[0]["items"]) == 15
        scored = [server.post("/v1/score", {"user": user, "item_ids": items})
                  for server in servers]
        assert scored[0] == scored[1]
        assert scored[0]["unknown_item_ids"] == ["unknown"]

    for server in servers:
        server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            code = server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit {STOP_TIMEOUT_S}s after SIGTERM; log:\n"
                                 f"{server.log()}") from None
        assert code == 0, f"exit code {code}; log:\n{server.log()}"


@pytest.mark.timeout(240)
def test_workers_share_the_port_and_stop_together(tmp_path: Path, model_store: Path,
                                                  redis_url: str) -> None:
    """`recsys-serve --workers 2`: two processes on one port (SO_REUSEPORT), both serving;
    SIGTERM to the supervisor drains both and exits 0."""
    import psutil

    server = start_server(tmp_path, model_store, redis_url, "workers", args=("--workers", "2"))
    process, port = server.process, server.port
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = psutil.Process(process.pid).children()
            time.sleep(0.1)
        assert len(workers) == 2, server.log()
        ready_in_a_row = 0  # each worker loads on its own; new connections reach either
        while ready_in_a_row < 10 and time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
            except httpx.TransportError:  # not listening yet
                answer = None
            ready = answer is not None and answer.status_code == 200
            ready_in_a_row = ready_in_a_row + 1 if ready else 0
            time.sleep(0.05)
        assert ready_in_a_row == 10, server.log()
        answers = []
        for n in range(20):  # new connections each time: the kernel spreads them
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                answers.append(client.post("/v1/recommend", json={"user": {"id": f"u{n + 1}"},
                                                                  "k": 5}).status_code)
        assert answers == [200] * 20
        # Any worker answers the scrape for all of them (multiprocess mode).
        for _ in range(3):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            served = sum(value for name, labels, value in
                         metric_samples(text, "recsys_requests")
                         if name == "recsys_requests_total"
                         and labels["route"] == "/v1/recommend")
            assert served == 20
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S + 10) == 0, server.log()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        server.http.close()
        if process.poll() is None:
            process.kill()
