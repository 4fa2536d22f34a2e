"""/v1/recommend and /v1/score against a brute-force reference computed straight from the
SavedModel's signatures (item tower over items.parquet, user tower plus the query time's vector,
score head over the whole catalog), for random users, query times, k, exclusions and filters."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.serving.inputs import item_inputs
from service.serving.loader import read_metadata
from service.settings import Settings

from .helpers import make_settings, ok_json, started_client

CATEGORIES = ["books", "electronics", "fashion", "home", "sports", "toys", "beauty", "garden",
              "music", "games", "food", "travel"]
GENRES = ["classic", "modern", "family", "premium", "budget", "eco", "handmade", "vintage",
          "outdoor", "indoor", "kids", "pro", "luxury", "digital", "seasonal"]
SHALLOW_DEPTH = 20
SCORE_TOL = 1e-5


@dataclass
class Reference:
    """The SavedModel called directly, with the catalog's item matrix computed once."""

    saved_model: Any
    spec: Any
    items: pd.DataFrame
    users: dict[str, dict[str, Any]]
    item_ids: list[str]
    item_matrix: np.ndarray
    categories: np.ndarray
    genres: list[set[str]]

    def user_embedding(self, user_id: str | None, features: dict[str, Any] | None,
                       at: float) -> np.ndarray:
        """u at query time ``at``: the user tower's embedding plus the query time's vector."""
        tower = self.tower_embedding(user_id, features)
        times = self.saved_model.signatures["query_time"](
            query_time=tf.constant([at], tf.float64))
        return tower + np.asarray(times["time_embedding"], dtype=np.float32)

    def tower_embedding(self, user_id: str | None, features: dict[str, Any] | None
                        ) -> np.ndarray:
        stored = self.users.get(user_id) if user_id is not None else None
        merged = {name: stored[name] for name in self.spec.user_features.names} if stored else {}
        merged.update({k: v for k, v in (features or {}).items() if v is not None})
        history = [str(i) for i in stored["history"]] if stored else []
        width = self.spec.history_length
        history = history[-width:]
        padded = [""] * (width - len(history)) + history  # left-padded, as in training
        inputs: dict[str, tf.Tensor] = {
            "user_id": tf.constant([user_id if user_id is not None else ""], tf.string),
            "history": tf.constant([padded], tf.string)}
        for name in self.spec.user_features.categorical:
            value = merged.get(name)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            inputs[name] = tf.constant(["" if missing else str(value)], tf.string)
        for name in self.spec.user_features.numeric:
            value = merged.get(name)
            inputs[name] = tf.constant([np.nan if value is None else float(value)], tf.float32)
        assert not self.spec.user_features.multi  # the synthetic data has none
        out = self.saved_model.signatures["user_tower"](**inputs)
        return np.asarray(out["user_embedding"], dtype=np.float32)

    def head(self, user: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = self.saved_model.signatures["score"](
            user_embedding=tf.constant(user),
            item_embedding=tf.constant(self.item_matrix[rows][None]))
        return np.asarray(out["score"], dtype=np.float32)[0]

    def allowed(self, history: list[str], exclude_ids: list[str], exclude_seen: bool,
                filters: dict[str, list[str]]) -> np.ndarray:
        mask = np.ones(len(self.item_ids), dtype=bool)
        if "category" in filters:
            mask &= np.isin(self.categories, filters["category"])
        if "genre" in filters:
            wanted = set(filters["genre"])
            mask &= np.array([bool(g & wanted) for g in self.genres])
        banned = set(exclude_ids) | (set(history) if exclude_seen else set())
        mask &= np.array([i not in banned for i in self.item_ids])
        return mask


@pytest.fixture(scope="module")
def reference(version_dir: Path) -> Reference:
    saved_model = tf.saved_model.load(str(version_dir))
    _, spec = read_metadata(version_dir)
    items = pd.read_parquet(version_dir / "assets" / "items.parquet")
    items["item_id"] = items["item_id"].astype(str)
    items = items.reset_index(drop=True)
    columns = items.to_dict("list")
    out = saved_model.signatures["item_tower"](**item_inputs(spec.item_features, columns))
    matrix = np.asarray(out["item_embedding"], dtype=np.float32)
    assert matrix.shape == (len(items), spec.embedding_dim)
    users = pd.read_parquet(version_dir / "assets" / "users.parquet")
    users["user_id"] = users["user_id"].astype(str)
    stored = {}
    for row in users.to_dict("records"):
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in row.items()}
        stored[str(row["user_id"])] = clean
    return Reference(saved_model, spec, items, stored, items["item_id"].tolist(), matrix,
                     items["category"].astype(str).to_numpy(),
                     [{str(g) for g in genres} for genres in items["genre"]])


@pytest.fixture(scope="module")
def exhaustive_client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    """Reranks the whole catalog (rerank_depth >= 150 items): top-k is an argsort of the head."""
    with started_client(make_settings(model_store, redis_url, rerank_depth=1000)) as started:
        yield started


@pytest.fixture(scope="module")
def shallow_client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    """Two stages that matter: top-20 by u·c, then the head."""
    with started_client(make_settings(model_store, redis_url,
                                      rerank_depth=SHALLOW_DEPTH)) as started:
        yield started


# ---- random requests ---------------------------------------------------------------------------

feature_sets = st.fixed_dictionaries({}, optional={
    "gender": st.sampled_from(["F", "M", "X", "unknown-gender"]),
    "country": st.sampled_from(["US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "ZZ"]),
    "age": st.one_of(st.integers(10, 95), st.floats(10, 95, allow_nan=False)),
    "price_sensitivity": st.floats(0, 1, allow_nan=False),
})


# Across the tiny model's time buckets (its synthetic clock starts at 1.6e9, see
# service/data/synthetic.py) and beyond them on both sides, as numbers and as ISO 8601.
query_times = st.one_of(
    st.integers(1_599_000_000, 1_601_000_000),
    st.integers(1_599_000_000, 1_601_000_000).map(
        lambda t: dt.datetime.fromtimestamp(t, dt.UTC).isoformat()))


def seconds_of(body: dict[str, Any]) -> float:
    """The request's query time as the service reads it (Unix seconds; now when absent)."""
    value = body.get("context", {}).get("time")
    if value is None:
        return time.time()
    return float(value) if isinstance(value, int) else dt.datetime.fromisoformat(
        value).timestamp()


@st.composite
def users_strategy(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["known", "known+features", "unknown", "anonymous"]))
    user: dict[str, Any] = {}
    if kind.startswith("known"):
        user["id"] = f"u{draw(st.integers(1, 400))}"
    elif kind == "unknown":
        user["id"] = draw(st.sampled_from(["new-user", "u0", "u401", "U1"]))
    if kind != "known":
        user["features"] = draw(feature_sets)
    return user


@st.composite
def requests_strategy(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"user": draw(users_strategy()), "k": draw(st.integers(1, 160))}
    if draw(st.booleans()):  # else now
        body["context"] = {"time": draw(query_times)}
    if draw(st.booleans()):
        body["exclude_item_ids"] = draw(st.lists(
            st.one_of(st.integers(1, 150).map(lambda n: f"i{n}"), st.just("not-an-item")),
            max_size=30))
    if draw(st.booleans()):
        body["exclude_seen"] = draw(st.booleans())
    filters: dict[str, list[str]] = {}
    if draw(st.integers(0, 3)) == 0:
        filters["category"] = draw(st.lists(st.sampled_from(CATEGORIES), min_size=1,
                                            max_size=4, unique=True))
    if draw(st.integers(0, 3)) == 0:
        filters["genre"] = draw(st.lists(st.sampled_from(GENRES), min_size=1, max_size=4,
                                         unique=True))
    if filters:
        body["filters"] = filters
    return body


def expected_inputs(reference: Reference, body: dict[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user embedding [1, d], allowed mask [N], head scores over the whole catalog [N])."""
    user = body["user"]
    user_id = user.get("id")
    embedding = reference.user_embedding(user_id, user.get("features"), seconds_of(body))
    stored = reference.users.get(user_id) if user_id is not None else None
    history = [str(i) for i in stored["history"]] if stored else []
    allowed = reference.allowed(history, body.get("exclude_item_ids", []),
                                body.get("exclude_seen", True), body.get("filters", {}))
    scores = reference.head(embedding, np.arange(len(reference.item_ids)))
    return embedding, allowed, scores


def assert_same_ranking(reference: Reference, got: list[dict[str, Any]], expected: np.ndarray,
                        all_scores: np.ndarray, allowed: np.ndarray) -> None:
    """got equals the expected rows (ids exactly, scores within SCORE_TOL); where the expected
    scores tie, any order of the tied items is accepted."""
    want_ids = [reference.item_ids[r] for r in expected]
    want_scores = all_scores[expected]
    got_ids = [entry["item_id"] for entry in got]
    got_scores = np.array([entry["score"] for entry in got])
    assert len(got_ids) == len(want_ids), (got_ids, want_ids)
    assert len(set(got_ids)) == len(got_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=SCORE_TOL, rtol=0)
    rows = {item_id: n for n, item_id in enumerate(reference.item_ids)}
    for position, (got_id, want_id) in enumerate(zip(got_ids, want_ids, strict=True)):
        if got_id == want_id:
            continue
        tied = np.sum(np.abs(want_scores - want_scores[position]) <= 1e-6) > 1
        assert tied, f"position {position}: got {got_id}, expected {want_id}"
        row = rows[got_id]
        assert allowed[row] and abs(all_scores[row] - got_scores[position]) <= SCORE_TOL


def stable_top(values: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k candidates with the largest values, best first (ties: lower row first)."""
    order = np.argsort(-values[candidates], kind="stable")
    return candidates[order[:k]]


HYPOTHESIS = settings(max_examples=25, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])


@HYPOTHESIS
@given(body=requests_strategy())
def test_recommend_equals_brute_force_over_the_catalog(exhaustive_client: TestClient,
                                                       reference: Reference,
                                                       body: dict[str, Any]) -> None:
    _, allowed, scores = expected_inputs(reference, body)
    expected = stable_top(scores, np.flatnonzero(allowed), body["k"])
    got = ok_json(exhaustive_client.post("/v1/recommend", json=body))["items"]
    assert_same_ranking(reference, got, expected, scores, allowed)


@HYPOTHESIS
@given(body=requests_strategy())
def test_recommend_equals_two_stage_reference(shallow_client: TestClient,
                                              reference: Reference,
                                              body: dict[str, Any]) -> None:
    expected, scores, allowed = two_stage(reference, body, SHALLOW_DEPTH)
    got = ok_json(shallow_client.post("/v1/recommend", json=body))["items"]
    assert_same_ranking(reference, got, expected, scores, allowed)


def two_stage(reference: Reference, body: dict[str, Any], depth: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The expected rows (the head's top k of the best max(depth, k) by u·c), the head's
    scores of the candidates (NaN elsewhere) and the allowed mask."""
    embedding, allowed, _ = expected_inputs(reference, body)
    k = body["k"]
    coarse = (embedding @ reference.item_matrix.T)[0]
    candidates = stable_top(coarse, np.flatnonzero(allowed), max(depth, k))
    fine = reference.head(embedding, candidates)
    order = np.argsort(-fine, kind="stable")[:k]
    scores = np.full(len(reference.item_ids), np.nan, dtype=np.float32)
    scores[candidates] = fine
    return candidates[order], scores, allowed


@HYPOTHESIS
@given(body=requests_strategy(),
       item_rows=st.lists(st.integers(0, 149), min_size=1, max_size=40))
def test_score_equals_the_head(exhaustive_client: TestClient, reference: Reference,
                               body: dict[str, Any], item_rows: list[int]) -> None:
    _, _, scores = expected_inputs(reference, body)
    item_ids = [reference.item_ids[r] for r in item_rows]
    got = ok_json(exhaustive_client.post("/v1/score", json={
        "user": body["user"], "item_ids": item_ids, **{k: v for k, v in body.items()
                                                        if k == "context"}}))
    assert [s["item_id"] for s in got["scores"]] == item_ids
    np.testing.assert_allclose([s["score"] for s in got["scores"]], scores[item_rows],
                               atol=SCORE_TOL, rtol=0)


def test_default_depth_is_the_settings_one(client: TestClient, reference: Reference) -> None:
    """The default settings rerank Settings().rerank_depth items (fewer than this catalog's
    150), as the two-stage reference does at that depth."""
    depth = Settings().rerank_depth
    assert depth < len(reference.item_ids)
    body = {"user": {"id": "u9"}, "k": 30, "exclude_seen": False}
    expected, scores, allowed = two_stage(reference, body, depth)
    got = ok_json(client.post("/v1/recommend", json=body))["items"]
    assert_same_ranking(reference, got, expected, scores, allowed)
