"""Redis is an accelerator, never a dependency: down at start, killed under traffic, back empty,
or accepting connections and never answering, the service keeps answering.

Tests that kill or restart Redis use their own EmbeddedRedis (never the session's). Wiped, stale
and corrupt entries, and entries of other content, are covered by tests/serving/test_redis_cache.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.redis_server import EmbeddedRedis, free_port
from tests.serving.helpers import (
    item_matrix_loads,
    make_settings,
    ok_json,
    started_client,
    unique_prefix,
    wait_ready,
)

from .conftest import MODEL, SilentRedis, Traffic, publish_version, version_tag, wait_for

SCORE_BODY = {"user": {"id": "u1"}, "item_ids": [f"i{n}" for n in range(1, 151, 10)]}
RECOMMEND_BODY = {"user": {"id": "u7"}, "k": 10}
USERS = 400  # the tiny trained model's users (tests/conftest.py)


@pytest.fixture
def restarted() -> Iterator[list[EmbeddedRedis]]:
    """Redis servers a test starts on a port it chose; all stopped at the end."""
    servers: list[EmbeddedRedis] = []
    yield servers
    for server in servers:
        server.stop()


def restart_on(port: int, servers: list[EmbeddedRedis]) -> redis.Redis:
    """A new, empty Redis on `port`; returns a client on it."""
    servers.append(EmbeddedRedis(port=port).start())
    return redis.Redis(host="127.0.0.1", port=port)


def kill(server: EmbeddedRedis) -> None:
    """SIGKILL: Redis goes away mid-conversation, no goodbye, nothing saved."""
    process = server._process  # EmbeddedRedis exposes no kill(); the test owns this process
    assert process is not None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def readiness(client: TestClient) -> dict[str, Any]:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def owed_entries_written(client: redis.Redis, base: str) -> bool:
    try:
        return bool(client.exists(f"{base}:items:manifest")) and \
            bool(client.exists(f"{base}:users:complete"))
    except redis.ConnectionError:
        return False


def served_fingerprint(client: TestClient) -> str:
    fingerprint: str = ok_json(client.get("/v1/model"))["fingerprint"]
    return fingerprint


def traffic_calls(client: TestClient) -> dict[str, Any]:
    def recommend() -> httpx.Response:
        return client.post("/v1/recommend", json=RECOMMEND_BODY)

    def score() -> httpx.Response:
        return client.post("/v1/score", json=SCORE_BODY)

    return {"recommend0": recommend, "recommend1": recommend, "score": score,
            "readyz": lambda: client.get("/readyz")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("poll_interval_s", [0.5, 0.0], ids=["polling", "no_polling"])
def test_redis_down_at_start_serves_degraded_then_writes_what_it_owes(
        model_store: Path, restarted: list[EmbeddedRedis], poll_interval_s: float) -> None:
    port = free_port()  # nothing listens there: Redis is down
    prefix = unique_prefix("down")
    settings = make_settings(model_store, f"redis://127.0.0.1:{port}/0", redis_prefix=prefix,
                             poll_interval_s=poll_interval_s)
    # The maintenance tick: the poll interval, or every 5 s with polling off.
    catch_up_s = 10.0 if poll_interval_s else 5.0 + 10.0
    with started_client(settings) as client:
        ready = wait_ready(client)
        assert ready["status"] == "degraded", ready
        assert ready["checks"]["redis"]["ok"] is False and ready["checks"]["model"]["ok"], ready
        assert item_matrix_loads(client.get("/metrics").text) == {"computed": 1.0}
        expected = ok_json(client.post("/v1/score", json=SCORE_BODY))
        assert len(ok_json(client.post("/v1/recommend", json=RECOMMEND_BODY))["items"]) == 10
        base = version_tag(prefix, served_fingerprint(client))

        back = restart_on(port, restarted)
        wait_for(lambda: owed_entries_written(back, base), catch_up_s,
                 "the item matrix and user table written once Redis is back")
        assert back.hlen(f"{base}:users") == USERS
        wait_for(lambda: readiness(client)["status"] == "ready", catch_up_s,
                 "readiness back to ready")
        assert readiness(client)["checks"]["redis"] == {"ok": True}

    # What it wrote is a whole, valid entry: the next process reads it instead of computing.
    with started_client(make_settings(model_store, restarted[0].url,
                                      redis_prefix=prefix)) as second:
        assert item_matrix_loads(second.get("/metrics").text) == {"redis": 1.0}
        assert ok_json(second.post("/v1/score", json=SCORE_BODY)) == expected


@pytest.mark.timeout(120)
def test_redis_killed_under_traffic_fails_no_request(model_store: Path,
                                                    own_redis: EmbeddedRedis,
                                                    restarted: list[EmbeddedRedis]) -> None:
    settings = make_settings(model_store, own_redis.url, poll_interval_s=0.5)
    with started_client(settings) as client:
        assert wait_ready(client)["status"] == "ready"
        with Traffic(traffic_calls(client)) as traffic:
            for worker in traffic.calls:
                traffic.wait_count(worker, 3)
            kill(own_redis)
            wait_for(lambda: readiness(client)["status"] == "degraded", 10,
                     "readiness saying degraded")
            seen = len(traffic.snapshot())
            wait_for(lambda: len(traffic.snapshot()) > seen + 30, 30, "traffic without Redis")
            restart_on(own_redis.port, restarted)
            wait_for(lambda: readiness(client)["status"] == "ready", 15, "ready again")
            seen = len(traffic.snapshot())
            wait_for(lambda: len(traffic.snapshot()) > seen + 30, 30, "traffic after Redis")
        outcomes = traffic.snapshot()
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    statuses = {o.body["status"] for o in outcomes if o.worker == "readyz"}
    assert statuses == {"ready", "degraded"}, statuses


@pytest.mark.timeout(120)
def test_redis_back_empty_gets_the_served_version_again(model_store: Path,
                                                       own_redis: EmbeddedRedis,
                                                       restarted: list[EmbeddedRedis]) -> None:
    """Redis restarts empty (a crash, a failover to an empty replica): once it answers, the
    service writes the served version's item matrix and user table again, so that the next
    process reads them instead of computing."""
    prefix = unique_prefix("back")
    settings = make_settings(model_store, own_redis.url, redis_prefix=prefix,
                             poll_interval_s=0.5)
    with started_client(settings) as client:
        base = version_tag(prefix, served_fingerprint(client))
        first = redis.Redis.from_url(own_redis.url)
        assert owed_entries_written(first, base)
        first_run = first.info("server")["run_id"]
        first.close()
        kill(own_redis)
        wait_for(lambda: readiness(client)["status"] == "degraded", 10, "degraded")
        back = restart_on(own_redis.port, restarted)
        # Another Redis process, started with nothing saved: whatever it holds was written
        # after it started. (Checking that it is empty would race the service's next tick.)
        assert back.info("server")["run_id"] != first_run
        wait_for(lambda: readiness(client)["status"] == "ready", 10, "ready again")
        wait_for(lambda: owed_entries_written(back, base), 10,
                 "the served version's item matrix and user table in the restarted Redis")
        assert back.hlen(f"{base}:users") == USERS


@pytest.mark.timeout(120)
def test_unresponsive_redis_never_hangs_a_request(store: Path) -> None:
    """A Redis that accepts connections and never answers: every call times out, so requests,
    readiness and even a reload stay bounded."""
    with SilentRedis(lifetime_s=100) as silent:
        settings = make_settings(store, silent.url)
        with started_client(settings, wait=False) as client:
            ready = wait_ready(client, 60)
            assert ready["status"] == "degraded", ready
            assert silent.connections > 0, "the service never tried the silent Redis"
            for n in range(5):
                started = time.monotonic()
                body = ok_json(client.post("/v1/recommend",
                                           json={"user": {"id": f"u{n + 1}"}, "k": 5}))
                assert len(body["items"]) == 5
                assert time.monotonic() - started < 2.0
            started = time.monotonic()
            ok_json(client.post("/v1/score", json=SCORE_BODY))
            assert time.monotonic() - started < 2.0
            started = time.monotonic()
            assert readiness(client)["status"] == "degraded"
            assert time.monotonic() - started < 2.5

            publish_version(store / MODEL, 2)
            started = time.monotonic()
            body = ok_json(client.post("/v1/admin/reload"))
            assert body == {"model": {"name": MODEL, "version": 2}, "changed": True}
            assert time.monotonic() - started < 15.0
            started = time.monotonic()
            ok_json(client.post("/v1/recommend", json=RECOMMEND_BODY))
            assert time.monotonic() - started < 2.0
