"""Hot reload under traffic: a new version is noticed by polling or asked for on
POST /v1/admin/reload, loaded and warmed while the old one serves, then switched to atomically.

Version 2 here has the same weights and ids as version 1 but its items' features rotated by one
row, so it scores differently: every answer can be checked against the version it names.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from tests.serving.helpers import make_settings, ok_json, started_client

from .conftest import MODEL, Outcome, Traffic, publish_version, read_metric, wait_for

ITEMS = [f"i{n}" for n in range(1, 151, 5)]
USER = {"id": "u1"}
SCORE_BODY = {"user": USER, "item_ids": ITEMS}
RECOMMEND_BODY = {"user": USER, "k": 10}


def rotate_item_features(version_dir: Path) -> None:
    """Same ids, same weights, every item given its neighbour's features: other scores."""
    path = version_dir / "assets" / "items.parquet"
    items = pd.read_parquet(path)
    features = [c for c in items.columns if c != "item_id"]
    order = np.roll(np.arange(len(items)), 1)
    rotated = items[features].iloc[order].reset_index(drop=True)
    pd.concat([items[["item_id"]], rotated], axis=1).to_parquet(path, index=False)


def scores_of(body: dict[str, Any]) -> list[float]:
    assert [s["item_id"] for s in body["scores"]] == ITEMS, body
    return [s["score"] for s in body["scores"]]


def version_of(outcome: Outcome) -> int | None:
    body = outcome.body
    if outcome.status != 200 or not isinstance(body, dict):
        return None
    if "model" in body:
        return int(body["model"]["version"])
    if "checks" in body:
        return int(body["checks"]["model"]["version"])
    return None


def traffic_calls(client: TestClient) -> dict[str, Any]:
    def score() -> httpx.Response:
        return client.post("/v1/score", json=SCORE_BODY)

    def recommend() -> httpx.Response:
        return client.post("/v1/recommend", json=RECOMMEND_BODY)

    return {"score0": score, "score1": score, "recommend": recommend,
            "readyz": lambda: client.get("/readyz"), "healthz": lambda: client.get("/healthz")}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("trigger", ["poll", "admin"])
def test_switch_under_traffic_is_atomic(store: Path, redis_url: str, trigger: str) -> None:
    model_dir = store / MODEL
    settings = make_settings(store, redis_url, poll_interval_s=0.5 if trigger == "poll" else 0)
    with started_client(settings) as client:
        v1_scores = scores_of(ok_json(client.post("/v1/score", json=SCORE_BODY)))
        with Traffic(traffic_calls(client)) as traffic:
            for worker in traffic.calls:
                traffic.wait_count(worker, 3)
            publish_version(model_dir, 2, change=rotate_item_features)
            if trigger == "admin":
                assert ok_json(client.post("/v1/admin/reload")) == {
                    "model": {"name": MODEL, "version": 2}, "changed": True}
            for worker in traffic.calls:
                if worker != "healthz":
                    wait_for(lambda w=worker: any(o.worker == w and version_of(o) == 2
                                                  for o in traffic.snapshot()),
                             30, f"{worker} answered by version 2")
            seen = len(traffic.snapshot())
            wait_for(lambda: len(traffic.snapshot()) > seen + 20, 30, "traffic after the switch")
        outcomes = traffic.snapshot()
        v2_scores = scores_of(ok_json(client.post("/v1/score", json=SCORE_BODY)))
        assert ok_json(client.get("/v1/model"))["version"] == 2
        assert read_metric(client, "recsys_model_loads") == 2

    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert max(abs(a - b) for a, b in zip(v1_scores, v2_scores, strict=True)) > 1e-3, \
        "version 2 must score differently for this test to tell the versions apart"

    expected = {1: v1_scores, 2: v2_scores}
    recommended: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for outcome in outcomes:
        version = version_of(outcome)
        if outcome.worker.startswith("score"):
            # The whole request ran on the version it names: its scores are that version's.
            assert version in expected, outcome
            np.testing.assert_allclose(scores_of(outcome.body), expected[version], atol=1e-6,
                                       rtol=0, err_msg=f"an answer naming version {version}")
        elif outcome.worker == "recommend":
            assert version in expected, outcome
            recommended[version].append(outcome.body)
        elif outcome.worker == "readyz":
            # An old version serving is ready; readiness never dips during the switch.
            assert outcome.body["status"] == "ready", outcome
            assert version in expected, outcome
        else:
            assert outcome.body == {"status": "ok"}, outcome
    assert set(recommended) == {1, 2}
    for version, bodies in recommended.items():
        # Answers naming one version are that version's answer (batched with other requests
        # or not): the same items, the same scores up to float rounding.
        first = bodies[0]["items"]
        assert first != recommended[3 - version][0]["items"]
        for body in bodies:
            assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in first]
            np.testing.assert_allclose([i["score"] for i in body["items"]],
                                       [i["score"] for i in first], atol=1e-6, rtol=0)

    by_worker: dict[str, list[int]] = defaultdict(list)
    for outcome in sorted(outcomes, key=lambda o: o.started):
        version = version_of(outcome)
        if version is not None:
            by_worker[outcome.worker].append(version)
    for worker, versions in by_worker.items():
        # One switch, once: after a worker saw version 2 it never sees version 1 again.
        assert versions == sorted(versions), f"{worker} went back to the old version"
        assert versions[0] == 1 and versions[-1] == 2, worker
