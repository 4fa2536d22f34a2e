"""The app and the shared Redis cache: computed once, read by the next process, namespaced by
model, version and fingerprint, corruption detected, the user table published."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient

from service.model_format import content_fingerprint

from .helpers import item_matrix_loads, make_settings, ok_json, started_client, unique_prefix

ITEMS = [f"i{n}" for n in range(1, 151)]
USERS = [{"id": "u1"}, {"id": "u77"}, {}, {"id": "cold", "features": {"gender": "F"}}]


@pytest.fixture
def client_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the private server; tests here use their own prefixes, so nothing is flushed
    under other tests' feet."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def all_scores(client: TestClient) -> list[list[float]]:
    out = []
    for user in USERS:
        body = ok_json(client.post("/v1/score", json={"user": user, "item_ids": ITEMS}))
        assert [s["item_id"] for s in body["scores"]] == ITEMS
        out.append([s["score"] for s in body["scores"]])
    return out


def loads(client: TestClient) -> dict[str, float]:
    return item_matrix_loads(ok_json_text(client, "/metrics"))


def ok_json_text(client: TestClient, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return response.text


def keys_under(client: redis.Redis, prefix: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000)}


def tag(prefix: str, fingerprint: str, version: int = 1) -> str:
    return f"{prefix}{{default:{version}:{fingerprint}}}"


def test_second_app_reads_what_the_first_computed(model_store: Path, redis_url: str) -> None:
    prefix = unique_prefix("share")
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as first:
        assert loads(first) == {"computed": 1.0}
        assert ok_json(first.get("/readyz"))["checks"]["item_representations"]["source"] \
            == "computed"
        assert ok_json(first.get("/v1/model"))["item_representations_source"] == "computed"
        computed = all_scores(first)
        recommended = ok_json(first.post("/v1/recommend", json={"user": {"id": "u1"}, "k": 20}))
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as second:
        assert loads(second).get("computed", 0.0) == 0.0
        assert loads(second)["redis"] == 1.0
        assert ok_json(second.get("/readyz"))["checks"]["item_representations"]["source"] \
            == "redis"
        assert ok_json(second.get("/v1/model"))["item_representations_source"] == "redis"
        assert all_scores(second) == computed  # the same bytes: exactly the same scores
        assert ok_json(second.post("/v1/recommend", json={"user": {"id": "u1"}, "k": 20})) \
            == recommended


def test_keys_name_model_version_and_fingerprint(model_store: Path, redis_url: str,
                                                 client_redis: redis.Redis,
                                                 version_dir: Path) -> None:
    prefix = unique_prefix("keys")
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as client:
        fingerprint = ok_json(client.get("/v1/model"))["fingerprint"]
    assert fingerprint == content_fingerprint(version_dir)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    keys = keys_under(client_redis, prefix)
    base = tag(prefix, fingerprint)
    assert {f"{base}:items:manifest", f"{base}:items:chunks", f"{base}:users",
            f"{base}:users:complete"} <= keys, keys
    assert all(key.startswith(base + ":") for key in keys), keys
    assert not client_redis.exists(f"{base}:items:lock")  # released after computing

    manifest = json.loads(client_redis.get(f"{base}:items:manifest") or b"")
    assert manifest["count"] == 150
    assert manifest["dim"] == 64
    assert manifest["dtype"] == "<f4"
    assert manifest["checksum"].startswith("sha256:")
    chunks = client_redis.hgetall(f"{base}:items:chunks")
    assert len(chunks) == manifest["chunks"]
    assert sum(len(v) for v in chunks.values()) == 150 * 64 * 4
    for key in keys:  # every entry expires (a cache, not a store)
        assert client_redis.ttl(key) > 0, key


def test_same_name_and_version_different_content_do_not_share(
        tmp_path: Path, model_store: Path, redis_url: str, client_redis: redis.Redis) -> None:
    """Two stores with the same name and version but different content: two fingerprints."""
    prefix = unique_prefix("fp")
    other = tmp_path / "other"
    shutil.copytree(model_store, other)
    meta_path = other / "default" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["created_at"] = "2031-01-01T00:00:00+00:00"
    meta_path.write_text(json.dumps(meta))
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as first:
        first_fp = ok_json(first.get("/v1/model"))["fingerprint"]
    with started_client(make_settings(other, redis_url, redis_prefix=prefix)) as second:
        second_fp = ok_json(second.get("/v1/model"))["fingerprint"]
        assert loads(second) == {"computed": 1.0}
    assert first_fp != second_fp
    keys = keys_under(client_redis, prefix)
    assert f"{tag(prefix, first_fp)}:items:manifest" in keys
    assert f"{tag(prefix, second_fp)}:items:manifest" in keys


def flip_bytes(value: bytes) -> bytes:
    return bytes(b ^ 0x5A for b in value)


@pytest.mark.parametrize("damage", ["garbage_same_length", "truncated", "nan_same_length",
                                    "missing_chunk", "manifest_not_json"])
def test_corrupted_entry_is_detected_and_recomputed(model_store: Path, redis_url: str,
                                                    client_redis: redis.Redis,
                                                    damage: str) -> None:
    prefix = unique_prefix("corrupt")
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as first:
        fingerprint = ok_json(first.get("/v1/model"))["fingerprint"]
        expected = all_scores(first)
    base = tag(prefix, fingerprint)
    chunks_key, manifest_key = f"{base}:items:chunks", f"{base}:items:manifest"
    original = client_redis.hget(chunks_key, "0")
    assert original is not None
    if damage == "garbage_same_length":
        client_redis.hset(chunks_key, "0", flip_bytes(original))
    elif damage == "truncated":
        client_redis.hset(chunks_key, "0", original[: len(original) // 2])
    elif damage == "nan_same_length":
        client_redis.hset(chunks_key, "0", np.full(len(original) // 4, np.nan, "<f4").tobytes())
    elif damage == "missing_chunk":
        client_redis.hdel(chunks_key, "0")
    else:
        client_redis.set(manifest_key, b"{not json")

    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as second:
        assert loads(second) == {"computed": 1.0}
        scores = all_scores(second)
        for got, want in zip(scores, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # The damaged entry was replaced by a good one, which the next start reads.
    assert client_redis.hget(chunks_key, "0") == original
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as third:
        assert loads(third) == {"redis": 1.0}
        assert all_scores(third) == scores


def test_user_table_published(model_store: Path, redis_url: str, client_redis: redis.Redis,
                              users_table: pd.DataFrame) -> None:
    prefix = unique_prefix("users")
    with started_client(make_settings(model_store, redis_url, redis_prefix=prefix)) as client:
        fingerprint = ok_json(client.get("/v1/model"))["fingerprint"]
    key = f"{tag(prefix, fingerprint)}:users"
    assert client_redis.type(key) == b"hash"
    assert client_redis.hlen(key) == len(users_table) == 400
    marker = json.loads(client_redis.get(f"{key}:complete") or b"")
    assert marker["fields"] == 400
    for row in users_table.sample(20, random_state=0).to_dict("records"):
        raw = client_redis.hget(key, str(row["user_id"]))
        assert raw is not None, row["user_id"]
        stored: dict[str, Any] = json.loads(raw)
        assert stored["user_id"] == row["user_id"]
        assert stored["history"] == [str(i) for i in row["history"]]
        for name in ("gender", "country"):
            assert stored[name] == row[name]
        for name in ("age", "price_sensitivity"):
            assert math.isclose(stored[name], float(row[name]), rel_tol=1e-9)


def strict_json(raw: bytes) -> Any:
    """json.loads that refuses NaN/Infinity, which are not JSON (other tools read this too)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def test_published_users_are_strict_json_with_missing_features(
        tmp_path: Path, model_store: Path, redis_url: str, client_redis: redis.Redis) -> None:
    """A user whose features are missing (NaN age, no country) is published as valid JSON."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    users_path = store / "default" / "1" / "assets" / "users.parquet"
    users = pd.read_parquet(users_path)
    users.loc[users["user_id"] == "u1", "age"] = np.nan
    users.loc[users["user_id"] == "u1", "country"] = None
    users.to_parquet(users_path, index=False)
    prefix = unique_prefix("nan")
    with started_client(make_settings(store, redis_url, redis_prefix=prefix)) as client:
        fingerprint = ok_json(client.get("/v1/model"))["fingerprint"]
        # The service itself treats the missing values as missing.
        ok_json(client.post("/v1/score", json={"user": {"id": "u1"}, "item_ids": ["i1"]}))
    raw = client_redis.hget(f"{tag(prefix, fingerprint)}:users", "u1")
    assert raw is not None
    stored = strict_json(raw)
    assert stored["user_id"] == "u1"
    assert stored["age"] is None and stored["country"] is None
