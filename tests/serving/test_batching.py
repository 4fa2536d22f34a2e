"""Dynamic batching: concurrent requests computed together get exactly what each would get
alone, never another user's result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.serving.batching import InFlight, Runner
from service.serving.servable import RecommendCall

from .helpers import Server, metric_samples, running_server

USERS = [f"u{n}" for n in range(1, 97)]
LONG_WAIT_US = 2_000_000


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory, model_store: Path,
                    redis_url: str) -> Iterator[Server]:
    # A long wait, so that concurrent requests surely share batches: the worker only waits
    # for requests already received, never for a lone one (see the last test).
    with running_server(tmp_path_factory.mktemp("batching"), model_store, redis_url, "batch",
                        env={"RECSYS_BATCH_MAX_SIZE": "32",
                             "RECSYS_BATCH_TIMEOUT_US": str(LONG_WAIT_US)}) as server:
        yield server


def request_for(n: int, user: str) -> tuple[str, dict[str, Any]]:
    """Different users, k, exclusions and filters, and some scores, mixed in one burst."""
    if n % 4 == 3:
        return "/v1/score", {"user": {"id": user}, "item_ids": [f"i{n % 150 + 1}", "i7", "x"]}
    body: dict[str, Any] = {"user": {"id": user}, "k": 1 + n % 12,
                            "exclude_item_ids": [f"i{n % 50 + 1}"]}
    if n % 4 == 1:
        body["filters"] = {"category": ["books", "music", "games"]}
    if n % 4 == 2:
        body["user"] = {"features": {"age": 20 + n, "country": "JP"}}
        body["exclude_seen"] = False
    return "/v1/recommend", body


async def burst(port: int, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        answers = await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:3]
    return [a.json() for a in answers]


def assert_same(alone: dict[str, Any], together: dict[str, Any]) -> None:
    key = "items" if "items" in alone else "scores"
    assert [e["item_id"] for e in together[key]] == [e["item_id"] for e in alone[key]]
    for a, b in zip(alone[key], together[key], strict=True):
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)


def batches(server: Server) -> float:
    return sum(value for name, _, value in
               metric_samples(server.get("/metrics").text, "recsys_batch_size")
               if name == "recsys_batch_size_count")


def test_concurrent_requests_get_their_own_results(batching_server: Server) -> None:
    requests = [request_for(n, user) for n, user in enumerate(USERS)]
    alone = [batching_server.post(path, body) for path, body in requests]
    before = batches(batching_server)
    together = asyncio.run(burst(batching_server.port, requests))
    for a, b in zip(alone, together, strict=True):
        assert_same(a, b)
    # Concurrent requests share batches (the in-flight wait itself is tested below: an idle
    # server takes this burst in few batches even without it).
    assert batches(batching_server) - before <= len(requests) / 4


def test_the_worker_waits_only_for_requests_in_flight(client: TestClient) -> None:
    """Requests the process has received (in flight) join the batch of one queued before
    them; the wait ends as soon as none is left on its way, long before the timeout."""
    model = client.app.state.manager.current  # type: ignore[attr-defined]
    in_flight, sizes = InFlight(), list[int]()
    runner = Runner(32, LONG_WAIT_US / 1e6, on_batch=sizes.append, in_flight=in_flight)

    def call(user: str) -> RecommendCall:
        return RecommendCall(model.query(user, None), 10)

    async def three_arriving_apart() -> None:
        in_flight.count = 3  # received; two are still being read and validated
        first = asyncio.ensure_future(runner.recommend(model, call("u1")))
        await asyncio.sleep(0.2)
        await asyncio.gather(first, runner.recommend(model, call("u2")),
                             runner.recommend(model, call("u3")))

    async def one_left_without_queueing() -> float:
        in_flight.count = 2
        started = time.monotonic()
        first = asyncio.ensure_future(runner.recommend(model, call("u4")))
        await asyncio.sleep(0.2)
        in_flight.count = 1  # the other one was refused (a 4xx), never queued
        await first
        return time.monotonic() - started

    runner.start()
    try:
        asyncio.run(three_arriving_apart())
        assert sizes == [3]
        assert asyncio.run(one_left_without_queueing()) < LONG_WAIT_US / 1e6 / 2
        assert sizes == [3, 1]
    finally:
        runner.stop()


def test_a_lone_request_never_waits_for_company(batching_server: Server) -> None:
    """One client's requests run at once, however long the worker may wait for requests in
    flight: none are."""
    for user in USERS[:5]:
        started = time.monotonic()
        batching_server.post("/v1/recommend", {"user": {"id": user}, "k": 10})
        assert time.monotonic() - started < LONG_WAIT_US / 1e6 / 2
