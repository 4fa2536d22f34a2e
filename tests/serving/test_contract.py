"""The HTTP contract (CONTRACT.md) against the real app: trained model, private Redis, lifespan.

Every 4xx is checked for the error shape {"error": {"code", "message"}}; no request may get a 5xx
(503 not_ready only while no model is loaded, by design).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from service.model_format import content_fingerprint
from service.serving.schemas import RecommendResponse, ScoreResponse

from .helpers import (
    assert_error,
    make_settings,
    metric_samples,
    ok_json,
    started_client,
)

JSON = {"content-type": "application/json"}
DEFAULT_MAX_ITEM_IDS = 10_000
DEFAULT_MAX_K = 1000


def score(client: TestClient, body: dict[str, Any], **kwargs: Any) -> Any:
    return ok_json(client.post("/v1/score", json=body, **kwargs))


def recommend(client: TestClient, body: dict[str, Any], **kwargs: Any) -> Any:
    return ok_json(client.post("/v1/recommend", json=body, **kwargs))


def raw_post(client: TestClient, path: str, content: bytes, **headers: str) -> Any:
    return client.post(path, content=content, headers={**JSON, **headers})


def history_of(users: pd.DataFrame, user_id: str) -> list[str]:
    row = users.loc[users["user_id"] == user_id].iloc[0]
    return [str(i) for i in row["history"]]


def users_with_history(users: pd.DataFrame, n: int) -> list[str]:
    lengths = users["history"].map(len)
    return users.loc[lengths >= 3, "user_id"].head(n).tolist()


def ids_of(body: dict[str, Any]) -> list[str]:
    return [entry["item_id"] for entry in body["items"]]


# ---- probes and metrics ------------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_when_ready(client: TestClient) -> None:
    body = ok_json(client.get("/readyz"))
    assert body["status"] == "ready"
    checks = body["checks"]
    assert {"model", "item_representations", "redis"} <= set(checks)
    assert checks["model"]["ok"] is True
    assert checks["model"]["version"] == 1
    assert checks["item_representations"]["ok"] is True
    assert checks["item_representations"]["count"] == 150
    assert checks["redis"]["ok"] is True


def test_not_ready_on_an_empty_store(tmp_path: Path, redis_url: str) -> None:
    empty = tmp_path / "empty_store"
    empty.mkdir()
    with started_client(make_settings(empty, redis_url), wait=False) as client:
        response = client.get("/readyz")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["failed"] == "model"
        assert body["checks"]["model"]["ok"] is False
        assert client.get("/healthz").status_code == 200
        # The data plane says why in the error shape (503: not ready, by design).
        assert_error(client.post("/v1/score", json={"item_ids": ["i1"]}), 503, "not_ready")
        assert_error(client.post("/v1/recommend", json={"k": 3}), 503, "not_ready")
        assert_error(client.get("/v1/model"), 503, "not_ready")
        assert client.get("/metrics").status_code == 200


def test_metrics_are_prometheus_text_without_probes(client: TestClient) -> None:
    score(client, {"user": {"id": "u1"}, "item_ids": ["i1"]})
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert "recsys_requests" in families
    routes = {labels.get("route") for name, labels, _ in
              metric_samples(response.text, "recsys_requests") if name == "recsys_requests_total"}
    assert "/v1/score" in routes
    assert not routes & {"/healthz", "/readyz", "/metrics"}, routes


# ---- /v1/score ---------------------------------------------------------------------------------


def test_score_keeps_order_and_lists_unknown_ids(client: TestClient) -> None:
    asked = ["i7", "nope-1", "i3", "i120", "nope-2", "i1"]
    body = score(client, {"user": {"id": "u1"}, "item_ids": asked})
    assert body["model"] == {"name": "default", "version": 1}
    assert [s["item_id"] for s in body["scores"]] == ["i7", "i3", "i120", "i1"]
    assert body["unknown_item_ids"] == ["nope-1", "nope-2"]
    for entry in body["scores"]:
        assert 0.0 <= entry["score"] <= 1.0 and math.isfinite(entry["score"])


def test_hot_bodies_are_exactly_their_documented_models(client: TestClient) -> None:
    """/v1/score and /v1/recommend answer bytes built outside pydantic: each body must still
    be its OpenAPI response model, key for key."""
    scored = score(client, {"user": {"id": "u1"}, "item_ids": ["i7", "nope"]})
    assert ScoreResponse.model_validate(scored).model_dump() == scored
    recommended = recommend(client, {"user": {"id": "u1"}, "k": 3})
    assert RecommendResponse.model_validate(recommended).model_dump() == recommended
    assert len(recommended["items"]) == 3


def test_score_empty_item_ids(client: TestClient) -> None:
    body = score(client, {"user": {"id": "u1"}, "item_ids": []})
    assert body["scores"] == [] and body["unknown_item_ids"] == []


def test_score_only_unknown_ids(client: TestClient) -> None:
    body = score(client, {"user": {"id": "u1"}, "item_ids": ["x", "y"]})
    assert body["scores"] == [] and body["unknown_item_ids"] == ["x", "y"]


def test_score_duplicates(client: TestClient) -> None:
    body = score(client, {"user": {"id": "u2"}, "item_ids": ["i1", "i2", "i1", "zz", "zz"]})
    ids = [s["item_id"] for s in body["scores"]]
    assert ids == ["i1", "i2", "i1"]
    assert body["scores"][0]["score"] == pytest.approx(body["scores"][2]["score"], abs=1e-6)
    assert body["unknown_item_ids"] == ["zz", "zz"]


@pytest.mark.parametrize("user", [{}, {"id": "never-seen-user"}, {"features": {"age": 30}},
                                  {"id": "never-seen", "features": {"gender": "F",
                                                                    "country": "DE"}}])
def test_score_cold_start(client: TestClient, user: dict[str, Any]) -> None:
    body = score(client, {"user": user, "item_ids": ["i1", "i2", "i3"]})
    assert [s["item_id"] for s in body["scores"]] == ["i1", "i2", "i3"]
    assert all(math.isfinite(s["score"]) for s in body["scores"])


def test_score_without_user_object(client: TestClient) -> None:
    body = score(client, {"item_ids": ["i1"]})
    assert len(body["scores"]) == 1


def test_features_override_stored_ones(client: TestClient, users_table: pd.DataFrame) -> None:
    row = users_table.loc[users_table["user_id"] == "u1"].iloc[0]
    items = [f"i{n}" for n in range(1, 31)]
    stored = score(client, {"user": {"id": "u1"}, "item_ids": items})["scores"]
    # Restating the stored values changes nothing.
    same = score(client, {"user": {"id": "u1", "features": {
        "gender": row["gender"], "country": row["country"], "age": float(row["age"]),
        "price_sensitivity": float(row["price_sensitivity"])}}, "item_ids": items})["scores"]
    np.testing.assert_allclose([s["score"] for s in same], [s["score"] for s in stored],
                               atol=1e-6)
    other_gender = next(g for g in ("F", "M", "X") if g != row["gender"])
    changed = score(client, {"user": {"id": "u1", "features": {
        "gender": other_gender, "age": 18 if row["age"] > 40 else 70,
        "price_sensitivity": 1.0 - float(row["price_sensitivity"])}},
        "item_ids": items})["scores"]
    diff = np.abs(np.array([s["score"] for s in changed]) - [s["score"] for s in stored])
    assert diff.max() > 1e-4, "request features did not change any score"
    # null means "not given": the stored value stays.
    nulled = score(client, {"user": {"id": "u1", "features": {"gender": None}},
                            "item_ids": items})["scores"]
    np.testing.assert_allclose([s["score"] for s in nulled], [s["score"] for s in stored],
                               atol=1e-6)


def test_unknown_feature(client: TestClient) -> None:
    response = client.post("/v1/score", json={"user": {"features": {"shoe_size": 42}},
                                               "item_ids": ["i1"]})
    message = assert_error(response, 422, "unknown_feature")
    assert "shoe_size" in message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numeric_feature(client: TestClient, literal: bytes) -> None:
    body = b'{"user": {"id": "u1", "features": {"age": ' + literal + b'}}, "item_ids": ["i1"]}'
    response = raw_post(client, "/v1/score", body)
    assert_error(response, 422)
    assert response.json()["error"]["code"] in ("invalid_feature", "invalid_request")


@pytest.mark.parametrize("literal", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e400"])
def test_out_of_range_numeric_feature(client: TestClient, literal: bytes) -> None:
    """A JSON number beyond float range is bad input (422), not a server error."""
    body = b'{"user": {"features": {"age": ' + literal + b'}}, "item_ids": ["i1"]}'
    response = raw_post(client, "/v1/score", body)
    assert_error(response, 422)
    assert response.json()["error"]["code"] in ("invalid_feature", "invalid_request")


@pytest.mark.parametrize("features", [{"age": "old"}, {"age": True}, {"gender": True},
                                      {"gender": ["F"]}, {"country": 1.5}, {"age": [1]},
                                      {"gender": {"a": 1}}])
def test_wrongly_typed_feature(client: TestClient, features: dict[str, Any]) -> None:
    response = client.post("/v1/score", json={"user": {"features": features},
                                               "item_ids": ["i1"]})
    assert_error(response, 422)
    assert response.json()["error"]["code"] in ("invalid_feature", "invalid_request")


@pytest.mark.parametrize("body", [
    {"item_ids": "i1"},
    {"item_ids": [1, 2]},
    {"item_ids": None},
    {"user": {"id": 7}, "item_ids": ["i1"]},
    {"user": "u1", "item_ids": ["i1"]},
    {"user": {"features": [1, 2]}, "item_ids": ["i1"]},
    {"user": {"id": "u1"}},
    {"item_ids": ["i1"], "surprise": 1},
    {"user": {"features": {f"f{n}": 1 for n in range(65)}}, "item_ids": ["i1"]},
    {"user": {"id": "u1", "nickname": "x"}, "item_ids": ["i1"]},
    {"item_ids": ["i1"], "context": {"time": "yesterday"}},
    {"item_ids": ["i1"], "context": {"time": [1]}},
    {"item_ids": ["i1"], "context": {"time": 1e300}},
    {"item_ids": ["i1"], "context": {"time": "2026-13-01T00:00:00"}},
    {"item_ids": ["i1"], "context": {"place": "home"}},
    {"item_ids": ["i1"], "context": 1700000000},
    [],
    "i1",
])
def test_score_invalid_request(client: TestClient, body: Any) -> None:
    assert_error(client.post("/v1/score", json=body), 422, "invalid_request")


@pytest.mark.parametrize("body", [
    {"k": "5"},
    {"k": 5.0},
    {"k": True},
    {"k": None},
    {"exclude_seen": "yes"},
    {"exclude_item_ids": "i1"},
    {"filters": ["genre"]},
    {"filters": {"genre": "classic"}},
    {"filters": {"genre": [1]}},
    {"user": {"id": 3}},
    {"k": 3, "surprise": True},
    {"filters": {f"a{n}": ["x"] for n in range(33)}},
    {"context": {"time": "soon"}},
    {"context": {"time": {"s": 1}}},
])
def test_recommend_invalid_request(client: TestClient, body: Any) -> None:
    assert_error(client.post("/v1/recommend", json=body), 422, "invalid_request")


@pytest.mark.parametrize("content", [b"", b"not json", b"{", b'{"item_ids": ["i1"]',
                                     b"\xff\xfe", b"null", b"[]"])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_unparsable_body(client: TestClient, path: str, content: bytes) -> None:
    assert_error(raw_post(client, path, content), 422)


def test_missing_body_without_content_type(client: TestClient) -> None:
    assert_error(client.post("/v1/score"), 422)
    assert_error(client.post("/v1/recommend"), 422)


def test_default_item_id_limit(client: TestClient) -> None:
    ids = [f"i{n % 150 + 1}" for n in range(DEFAULT_MAX_ITEM_IDS)]
    body = score(client, {"user": {"id": "u1"}, "item_ids": ids})
    assert len(body["scores"]) == DEFAULT_MAX_ITEM_IDS
    response = client.post("/v1/score", json={"item_ids": [*ids, "i1"]})
    message = assert_error(response, 422, "limit_exceeded")
    assert "item_ids" in message and str(DEFAULT_MAX_ITEM_IDS) in message.replace(",", "")


@pytest.fixture(scope="module")
def limited_client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    with started_client(make_settings(model_store, redis_url, max_item_ids=50,
                                      max_k=20)) as started:
        yield started


def test_configured_item_id_limit(limited_client: TestClient) -> None:
    ids = [f"i{n}" for n in range(1, 51)]
    assert len(score(limited_client, {"item_ids": ids})["scores"]) == 50
    message = assert_error(limited_client.post("/v1/score", json={"item_ids": [*ids, "i51"]}),
                           422, "limit_exceeded")
    assert "item_ids" in message and "50" in message
    message = assert_error(limited_client.post("/v1/recommend", json={
        "exclude_item_ids": [f"x{n}" for n in range(51)]}), 422, "limit_exceeded")
    assert "exclude_item_ids" in message and "50" in message
    assert_error(limited_client.post("/v1/recommend", json={
        "filters": {"genre": [f"g{n}" for n in range(51)]}}), 422, "limit_exceeded")


def test_configured_k_limit(limited_client: TestClient) -> None:
    assert len(recommend(limited_client, {"user": {"id": "u1"}, "k": 20})["items"]) == 20
    message = assert_error(limited_client.post("/v1/recommend", json={"k": 21}), 422,
                           "limit_exceeded")
    assert "k" in message and "20" in message


# ---- /v1/recommend -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 10, 37])
def test_recommend_at_most_k_best_first(client: TestClient, k: int) -> None:
    body = recommend(client, {"user": {"id": "u3"}, "k": k})
    assert body["model"] == {"name": "default", "version": 1}
    items = body["items"]
    assert len(items) == k
    assert len(set(ids_of(body))) == k
    scores = [entry["score"] for entry in items]
    assert all(a >= b for a, b in itertools.pairwise(scores)), scores


def test_recommend_default_k(client: TestClient) -> None:
    assert len(recommend(client, {"user": {"id": "u3"}})["items"]) == 10
    assert len(recommend(client, {})["items"]) == 10


@pytest.mark.parametrize("k", [DEFAULT_MAX_K + 1, 10**9, 10**40])
def test_recommend_k_above_maximum(client: TestClient, k: int) -> None:
    message = assert_error(client.post("/v1/recommend", json={"k": k}), 422, "limit_exceeded")
    assert "k" in message and str(DEFAULT_MAX_K) in message


@pytest.mark.parametrize("k", [0, -1, -(10**9)])
def test_recommend_k_not_positive(client: TestClient, k: int) -> None:
    assert_error(client.post("/v1/recommend", json={"k": k}), 422)


def test_k_larger_than_catalog_returns_every_allowed_item(client: TestClient,
                                                          items_table: pd.DataFrame) -> None:
    body = recommend(client, {"user": {"id": "u1"}, "k": DEFAULT_MAX_K, "exclude_seen": False})
    assert sorted(ids_of(body)) == sorted(items_table["item_id"])
    body = recommend(client, {"user": {"id": "u1"}, "k": DEFAULT_MAX_K,
                              "exclude_item_ids": ["i1", "i2"], "exclude_seen": False})
    assert sorted(ids_of(body)) == sorted(set(items_table["item_id"]) - {"i1", "i2"})


def test_exclude_seen_by_default(client: TestClient, users_table: pd.DataFrame,
                                 items_table: pd.DataFrame) -> None:
    catalog = set(items_table["item_id"])
    for user_id in users_with_history(users_table, 5):
        seen = set(history_of(users_table, user_id)) & catalog
        assert seen
        body = recommend(client, {"user": {"id": user_id}, "k": DEFAULT_MAX_K})
        ids = ids_of(body)
        assert not seen & set(ids), (user_id, seen & set(ids))
        assert len(ids) == len(catalog) - len(seen)
        explicit = recommend(client, {"user": {"id": user_id}, "k": 10, "exclude_seen": True})
        assert ids_of(explicit) == ids[:10]


def test_exclude_seen_false_may_return_history(client: TestClient,
                                               users_table: pd.DataFrame) -> None:
    for user_id in users_with_history(users_table, 5):
        seen = set(history_of(users_table, user_id))
        body = recommend(client, {"user": {"id": user_id}, "k": DEFAULT_MAX_K,
                                  "exclude_seen": False})
        assert seen <= set(ids_of(body))


def test_exclude_item_ids(client: TestClient) -> None:
    base = recommend(client, {"user": {"id": "u5"}, "k": 20})
    excluded = [*ids_of(base)[:3], "not-an-item"]
    body = recommend(client, {"user": {"id": "u5"}, "k": 17, "exclude_item_ids": excluded})
    assert ids_of(body) == ids_of(base)[3:]


def test_filter_on_category(client: TestClient, items_table: pd.DataFrame) -> None:
    categories = sorted(items_table["category"].astype(str).unique())[:2]
    matching = set(items_table.loc[items_table["category"].isin(categories), "item_id"])
    body = recommend(client, {"user": {"id": "u1"}, "k": DEFAULT_MAX_K, "exclude_seen": False,
                              "filters": {"category": categories}})
    assert set(ids_of(body)) == matching
    body = recommend(client, {"user": {"id": "u1"}, "k": 3,
                              "filters": {"category": categories}})
    assert set(ids_of(body)) <= matching and len(body["items"]) == 3


def test_filter_on_multi_valued_genre(client: TestClient, items_table: pd.DataFrame) -> None:
    wanted = {"eco", "vintage"}
    matching = {row.item_id for row in items_table.itertuples()
                if wanted & {str(g) for g in row.genre}}
    assert 0 < len(matching) < len(items_table)
    body = recommend(client, {"user": {"id": "u2"}, "k": DEFAULT_MAX_K, "exclude_seen": False,
                              "filters": {"genre": sorted(wanted)}})
    assert set(ids_of(body)) == matching


def test_filters_combine_with_and(client: TestClient, items_table: pd.DataFrame) -> None:
    category = str(items_table["category"].iloc[0])
    genre = str(items_table["genre"].iloc[0][0])
    matching = {row.item_id for row in items_table.itertuples()
                if row.category == category and genre in set(row.genre)}
    body = recommend(client, {"user": {"id": "u2"}, "k": DEFAULT_MAX_K, "exclude_seen": False,
                              "filters": {"category": [category], "genre": [genre]}})
    assert set(ids_of(body)) == matching


@pytest.mark.parametrize("filters", [{"colour": ["red"]}, {"price": ["10"]},
                                     {"item_id": ["i1"]}])
def test_unknown_filter(client: TestClient, filters: dict[str, list[str]]) -> None:
    message = assert_error(client.post("/v1/recommend", json={"filters": filters}), 422,
                           "unknown_filter")
    assert next(iter(filters)) in message


@pytest.mark.parametrize("filters", [{"genre": ["no-such-genre"]}, {"category": []},
                                     {"category": ["books"], "genre": ["no-such-genre"]}])
def test_filter_matching_nothing(client: TestClient, filters: dict[str, list[str]]) -> None:
    assert recommend(client, {"user": {"id": "u1"}, "filters": filters})["items"] == []


@pytest.mark.parametrize("request_body", [
    {"user": {"id": "u1"}, "k": 25},
    {"user": {"id": "u7"}, "k": 40, "exclude_seen": False},
    {"user": {}, "k": 15},
    {"user": {"id": "ghost", "features": {"gender": "F", "age": 22.5}}, "k": 15},
    {"user": {"id": "u4", "features": {"country": "JP"}}, "k": 12,
     "filters": {"genre": ["modern", "classic"]}},
])
def test_recommend_scores_equal_score_endpoint(client: TestClient,
                                               request_body: dict[str, Any]) -> None:
    items = recommend(client, request_body)["items"]
    assert items
    scored = score(client, {"user": request_body["user"],
                            "item_ids": [entry["item_id"] for entry in items]})["scores"]
    assert [s["item_id"] for s in scored] == [entry["item_id"] for entry in items]
    for got, want in zip(items, scored, strict=True):
        assert abs(got["score"] - want["score"]) < 1e-6, (got, want)


@pytest.mark.parametrize("infinite", [b"Infinity", b"-Infinity", b"NaN"])
def test_non_finite_query_time(client: TestClient, infinite: bytes) -> None:
    body = b'{"item_ids": ["i1"], "context": {"time": ' + infinite + b"}}"
    assert_error(raw_post(client, "/v1/score", body), 422, "invalid_request")


def test_query_time_as_number_or_iso_8601(client: TestClient) -> None:
    """One instant three ways gives one answer; the model's first and last time buckets give
    different scores (the tiny model's synthetic clock starts at 1.6e9)."""
    asked = {"user": {"id": "u3"}, "item_ids": ["i1", "i2", "i3"]}

    def scores_at(at: Any) -> list[float]:
        return [s["score"] for s in score(client, {**asked, "context": {"time": at}})["scores"]]

    late = scores_at(1_700_000_000)
    assert scores_at("2023-11-14T22:13:20Z") == late
    assert scores_at("2023-11-14T23:13:20+01:00") == late
    assert scores_at("2023-11-14T22:13:20") == late  # no offset: UTC
    assert scores_at(1_500_000_000) != late
    items = recommend(client, {"user": {"id": "u3"}, "k": 3,
                               "context": {"time": 1_700_000_000}})["items"]
    again = score(client, {"user": {"id": "u3"}, "item_ids": [e["item_id"] for e in items],
                           "context": {"time": 1_700_000_000}})["scores"]
    np.testing.assert_allclose([e["score"] for e in items], [e["score"] for e in again],
                               atol=1e-6, rtol=0)


# ---- /v1/model ---------------------------------------------------------------------------------


def test_model_description(client: TestClient, metadata: dict[str, Any],
                           version_dir: Path) -> None:
    body = ok_json(client.get("/v1/model"))
    assert body["name"] == "default"
    assert body["version"] == 1
    assert body["item_count"] == 150
    assert body["embedding_dim"] == metadata["model"]["embedding_dim"]
    assert body["created_at"] == metadata["created_at"]
    assert body["metrics"] == metadata["evaluation"]["metrics"]
    assert body["metrics"]
    assert body["fingerprint"] == content_fingerprint(version_dir)
    assert body["query_time_buckets"] == len(metadata["model"]["time_boundaries"]) + 1


# ---- /v1/admin/reload --------------------------------------------------------------------------


def test_reload_without_new_version(client: TestClient) -> None:
    body = ok_json(client.post("/v1/admin/reload"))
    assert body["model"] == {"name": "default", "version": 1}
    assert body["changed"] is False


def copy_version(model_dir: Path, source: int, target: int, created_at: str) -> Path:
    dest = model_dir / str(target)
    shutil.copytree(model_dir / str(source), dest)
    meta_path = dest / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["created_at"] = created_at
    meta_path.write_text(json.dumps(meta))
    return dest


def test_reload_new_and_broken_versions(tmp_path: Path, model_store: Path,
                                        redis_url: str) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    model_dir = store / "default"
    with started_client(make_settings(store, redis_url)) as client:
        body = ok_json(client.post("/v1/admin/reload"))
        assert body == {"model": {"name": "default", "version": 1}, "changed": False}
        before = score(client, {"user": {"id": "u1"}, "item_ids": ["i1", "i2"]})

        copy_version(model_dir, 1, 2, "2030-01-01T00:00:00+00:00")
        body = ok_json(client.post("/v1/admin/reload"))
        assert body == {"model": {"name": "default", "version": 2}, "changed": True}
        described = ok_json(client.get("/v1/model"))
        assert described["version"] == 2
        assert described["created_at"] == "2030-01-01T00:00:00+00:00"
        after = score(client, {"user": {"id": "u1"}, "item_ids": ["i1", "i2"]})
        assert after["model"]["version"] == 2
        # Same weights: same scores.
        for a, b in zip(before["scores"], after["scores"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)

        # Version 3: truncated saved_model.pb.
        broken = copy_version(model_dir, 2, 3, "2030-01-02T00:00:00+00:00")
        pb = broken / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 3])
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert "version 3" in message
        assert score(client, {"user": {"id": "u1"}, "item_ids": ["i1"]})["model"] == {
            "name": "default", "version": 2}
        assert ok_json(client.get("/readyz"))["checks"]["model"]["version"] == 2
        # Asked again, the same answer (a refused version stays refused until it changes).
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert "version 3" in message

        # Version 4: no variables/.
        missing = copy_version(model_dir, 2, 4, "2030-01-03T00:00:00+00:00")
        shutil.rmtree(missing / "variables")
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert "version 4" in message
        assert ok_json(client.get("/v1/model"))["version"] == 2
        body = recommend(client, {"user": {"id": "u1"}, "k": 5})
        assert body["model"]["version"] == 2 and len(body["items"]) == 5


# ---- request ids -------------------------------------------------------------------------------


def test_request_id_echoed(client: TestClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123.x"})
    assert response.headers["x-request-id"] == "abc-123.x"
    response = client.post("/v1/score", json={"item_ids": ["i1"]},
                           headers={"X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    response = client.post("/v1/score", json={"item_ids": 1}, headers={"X-Request-ID": "bad-1"})
    assert response.status_code == 422
    assert response.headers["x-request-id"] == "bad-1"


def test_request_id_generated(client: TestClient) -> None:
    first = client.post("/v1/score", json={"item_ids": ["i1"]}).headers.get("x-request-id")
    second = client.get("/healthz").headers.get("x-request-id")
    assert first and second and first != second


def test_unsafe_request_id_is_replaced(client: TestClient) -> None:
    for value in ("has space", "x" * 500, "a\tb"):
        got = client.get("/healthz", headers={"X-Request-ID": value}).headers["x-request-id"]
        assert got and got != value


# ---- other HTTP errors -------------------------------------------------------------------------


def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/score"), 405)
    assert_error(client.post("/healthz"), 405)


# ---- API key -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    with started_client(make_settings(model_store, redis_url, api_key="s3cret")) as started:
        yield started


V1_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/score", {"user": {"id": "u1"}, "item_ids": ["i1"]}),
    ("POST", "/v1/recommend", {"user": {"id": "u1"}, "k": 3}),
    ("GET", "/v1/model", None),
    ("POST", "/v1/admin/reload", None),
]


@pytest.mark.parametrize(("method", "path", "body"), V1_CALLS)
def test_api_key_required(keyed_client: TestClient, method: str, path: str,
                          body: dict[str, Any] | None) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""},
                    {"X-API-Key": "S3CRET"}, {"Authorization": "Bearer s3cret"}):
        response = keyed_client.request(method, path, json=body, headers=headers)
        assert_error(response, 401, "unauthorized")
    response = keyed_client.request(method, path, json=body, headers={"X-API-Key": "s3cret"})
    assert response.status_code == 200, response.text


def test_api_key_checked_before_validation(keyed_client: TestClient) -> None:
    assert_error(keyed_client.post("/v1/score", json={"item_ids": 5}), 401, "unauthorized")
    assert_error(keyed_client.post("/v1/recommend", json={"k": 10**6}), 401, "unauthorized")


def test_api_key_checked_before_the_body_is_parsed(keyed_client: TestClient) -> None:
    """An unauthenticated caller learns nothing about the body's schema or syntax."""
    assert_error(raw_post(keyed_client, "/v1/score", b"not json"), 401, "unauthorized")
    assert_error(raw_post(keyed_client, "/v1/recommend", b"{"), 401, "unauthorized")


def test_probes_stay_open_with_api_key(keyed_client: TestClient) -> None:
    assert keyed_client.get("/healthz").status_code == 200
    assert keyed_client.get("/readyz").status_code == 200
    response = keyed_client.get("/metrics")
    assert response.status_code == 200
    assert "recsys_requests" in response.text


# ---- hostile ids -------------------------------------------------------------------------------

HOSTILE_IDS = ["*", "i1*", "recsys:*", "a:b:c", "{default:1:abc}", "}{", "with space",
               " i1", "i1 ", "line\nbreak", "tab\there", "\r\n", "日本語", "emoji-🙂",
               "é", "\u200b", "\x00", "'; DROP TABLE items; --", "../../etc/passwd",
               "%2A", "\\", '"', "x" * 256, "é" * 256]


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_hostile_ids_are_just_unknown(client: TestClient, hostile: str) -> None:
    body = score(client, {"user": {"id": hostile}, "item_ids": [hostile, "i1"]})
    assert [s["item_id"] for s in body["scores"]] == ["i1"]
    assert body["unknown_item_ids"] == [hostile]
    body = recommend(client, {"user": {"id": hostile}, "k": 5, "exclude_item_ids": [hostile]})
    assert len(body["items"]) == 5
    body = recommend(client, {"user": {"id": hostile}, "filters": {"genre": [hostile]}})
    assert body["items"] == []
    body = score(client, {"user": {"features": {"gender": hostile, "country": hostile}},
                          "item_ids": ["i1"]})
    assert len(body["scores"]) == 1


@pytest.mark.parametrize("long_id", ["x" * 257, "é" * 257, "y" * 100_000])
def test_overlong_ids_are_refused(client: TestClient, long_id: str) -> None:
    for path, body in (("/v1/score", {"user": {"id": long_id}, "item_ids": ["i1"]}),
                       ("/v1/score", {"item_ids": ["i1", long_id]}),
                       ("/v1/recommend", {"exclude_item_ids": [long_id]}),
                       ("/v1/recommend", {"filters": {"genre": [long_id]}}),
                       ("/v1/recommend", {"user": {"id": long_id}})):
        assert_error(client.post(path, json=body), 422, "invalid_request")


@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_lone_surrogates_are_refused(client: TestClient, path: str) -> None:
    content = b'{"user": {"id": "\\ud800"}, "item_ids": ["i1"]}' if path == "/v1/score" \
        else b'{"user": {"id": "u1"}, "exclude_item_ids": ["\\udfff"]}'
    assert_error(raw_post(client, path, content), 422)


# ---- never a 5xx: random bodies ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
feature_values = (st.none() | st.booleans() | st.integers(-10**30, 10**30)
                  | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
                  | st.lists(st.text(max_size=5), max_size=3) | json_values)
users = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=20), st.sampled_from(["u1", "u2", "u3"]), json_values),
    "features": st.one_of(json_values, st.dictionaries(
        st.sampled_from(["gender", "country", "age", "price_sensitivity", "other"]),
        feature_values, max_size=4))})
item_lists = st.one_of(st.lists(st.one_of(st.sampled_from(["i1", "i2", "i150"]),
                                          st.text(max_size=10)), max_size=6), json_values)
score_bodies = st.one_of(json_values, st.fixed_dictionaries(
    {}, optional={"user": users, "item_ids": item_lists, "extra": json_values}))
recommend_bodies = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "user": users, "k": st.one_of(st.integers(-5, 2000), json_values),
    "exclude_item_ids": item_lists, "exclude_seen": st.one_of(st.booleans(), json_values),
    "filters": st.one_of(json_values, st.dictionaries(
        st.sampled_from(["genre", "category", "price", "x"]),
        st.lists(st.sampled_from(["eco", "books", "classic", ""]), max_size=3), max_size=3))}))


def check_answer(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert_error(response, response.status_code)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=score_bodies)
def test_random_score_bodies_never_fail(client: TestClient, body: Any) -> None:
    check_answer(client.post("/v1/score", json=body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=recommend_bodies)
def test_random_recommend_bodies_never_fail(client: TestClient, body: Any) -> None:
    check_answer(client.post("/v1/recommend", json=body))
