"""Dynamic batching: concurrent requests computed together get exactly what each would get
alone, never another user's result."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import Server, metric_samples, running_server

USERS = [f"u{n}" for n in range(1, 97)]


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory, model_store: Path,
                    redis_url: str) -> Iterator[Server]:
    # A generous wait so that concurrent requests surely share batches.
    with running_server(tmp_path_factory.mktemp("batching"), model_store, redis_url, "batch",
                        env={"RECSYS_BATCH_MAX_SIZE": "32",
                             "RECSYS_BATCH_TIMEOUT_US": "20000"}) as server:
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


def test_concurrent_requests_get_their_own_results(batching_server: Server) -> None:
    requests = [request_for(n, user) for n, user in enumerate(USERS)]
    alone = [batching_server.post(path, body) for path, body in requests]
    together = asyncio.run(burst(batching_server.port, requests))
    for a, b in zip(alone, together, strict=True):
        assert_same(a, b)
    sizes = [(labels, value) for name, labels, value in
             metric_samples(batching_server.get("/metrics").text, "recsys_batch_size")
             if name == "recsys_batch_size_bucket"]
    single = sum(v for labels, v in sizes if labels.get("le") == "1.0")
    total = sum(v for labels, v in sizes if labels.get("le") == "+Inf")
    assert total > single, "no request was ever batched with another"
