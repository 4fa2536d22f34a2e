"""Real `recsys-serve` replicas on one Redis (a single server or a Redis Cluster): one computes
the item matrix, the others read it; all answer identically; killing one leaves the others
serving; they stop cleanly on SIGTERM. And `--workers`: several processes on one port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
REPLICAS = 3
PROCESS_DB = 5  # a database of the private Redis that no other test uses
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@pytest.fixture(params=["standalone", "cluster"])
def servers(request: pytest.FixtureRequest, tmp_path: Path,
            model_store: Path) -> Iterator[list[Server]]:
    """Three `recsys-serve` processes over one store and one Redis: a single server or a
    three-node Redis Cluster (RECSYS_REDIS_CLUSTER)."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    env = {**os.environ, "RECSYS_MODEL_STORE": str(store),
           "RECSYS_REDIS_PREFIX": unique_prefix("proc"), "RECSYS_POLL_INTERVAL_S": "0",
           "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "RECSYS_LOG_LEVEL": "INFO"}
    if request.param == "cluster":
        env.update(RECSYS_REDIS_URL=request.getfixturevalue("redis_cluster_url"),
                   RECSYS_REDIS_CLUSTER="true")
    else:
        redis_url = request.getfixturevalue("redis_url")
        env["RECSYS_REDIS_URL"] = f"{redis_url.rsplit('/', 1)[0]}/{PROCESS_DB}"
        with redis.Redis.from_url(env["RECSYS_REDIS_URL"]) as flush:
            flush.flushdb()
    env.pop("RECSYS_API_KEY", None)
    started: list[Server] = []
    try:
        for n in range(REPLICAS):
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


def answers(server: Server) -> list[Any]:
    """What one replica answers for a fixed set of users and items."""
    items = [f"i{n}" for n in range(1, 151, 7)] + ["unknown"]
    out = []
    for user in ({"id": "u1"}, {"id": "u250"}, {}, {"features": {"gender": "X", "age": 30}}):
        out.append(server.post("/v1/recommend", {"user": user, "k": 15}))
        out.append(server.post("/v1/score", {"user": user, "item_ids": items}))
    out.append(server.post("/v1/recommend", {
        "user": {"id": "u1"}, "k": 5, "exclude_seen": True, "exclude_item_ids": items[:3],
        "filters": {"category": ["books", "music"], "genre": ["family", "budget"]}}))
    return out


@pytest.mark.timeout(300)
def test_replicas_share_one_item_matrix_and_survive_a_killed_peer(servers: list[Server]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for server in servers:
        try:
            wait_ready(server.http, max(1.0, deadline - time.monotonic()))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nexit code {server.process.poll()}; log:\n"
                                 f"{server.log()}") from None

    # The fleet computes the matrix once; every other replica reads it from Redis.
    loads = [item_matrix_loads(server.get("/metrics").text) for server in servers]
    assert sum(load.get("computed", 0.0) for load in loads) == 1.0, loads
    assert sum(load.get("redis", 0.0) for load in loads) == REPLICAS - 1, loads
    assert all(sum(load.values()) == 1.0 for load in loads), loads

    versions = {server.post("/v1/admin/reload", {})["model"]["version"] for server in servers}
    assert versions == {1}
    expected = answers(servers[0])
    assert len(expected[0]["items"]) == 15
    assert expected[1]["unknown_item_ids"] == ["unknown"]
    assert len(expected[-1]["items"]) == 5
    for server in servers[1:]:
        assert answers(server) == expected
    # Having answered all of that, no server process has imported pandas (cli.LeaveOut: about
    # 50 MB of each process).
    for server in servers:
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "/site-packages/pandas/" not in maps

    # SIGKILL one replica (the one that computed, the lock holder) while the others serve.
    victim = next(s for s, load in zip(servers, loads, strict=True) if load.get("computed"))
    survivors = [s for s in servers if s is not victim]
    failures: list[str] = []
    stop = threading.Event()

    def traffic(server: Server) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            while not stop.is_set():
                response = client.post("/v1/recommend", json={"user": {"id": "u7"}, "k": 5})
                if response.status_code != 200:
                    failures.append(f"{server.port}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=traffic, args=(s,)) for s in survivors]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    victim.process.kill()
    victim.process.wait(timeout=10)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures[:5]
    for server in survivors:
        assert server.get("/readyz").status_code == 200, server.log()
        assert answers(server) == expected

    for server in survivors:
        server.process.send_signal(signal.SIGTERM)
    for server in survivors:
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
