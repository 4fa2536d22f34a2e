"""Hostile input never gets a 5xx: a schemathesis run against the app's own OpenAPI schema,
oversized, mistyped, non-JSON, non-finite and absurdly nested bodies, and ids spelled to address
Redis keys (which can address none).

Covered elsewhere (tests/serving/test_contract.py): NaN/Infinity/1e400 user features, unparsable
bodies, id-list and k limits, unicode and hostile ids being just unknown ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.serving.app import create_app
from service.settings import Settings
from tests.serving.helpers import (
    assert_error,
    make_settings,
    metric_samples,
    ok_json,
    started_client,
    unique_prefix,
    wait_ready,
)

from .conftest import keys_under

JSON = {"content-type": "application/json"}
SMALL_LIMIT = 2048
SCORE_BODY = {"user": {"id": "u1"}, "item_ids": ["i1", "i2"]}


def assert_client_error(response: Any) -> None:
    """A 4xx in the contract's error shape: never a 5xx, never a bare traceback."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert_error(response, response.status_code)


# ---- schemathesis against the app's own schema -------------------------------------------------


@pytest.fixture(scope="module")
def api_app(model_store: Path, redis_url: str) -> FastAPI:
    return create_app(make_settings(model_store, redis_url))


@pytest.fixture
def started_api(api_app: FastAPI) -> FastAPI:
    """The app with its lifespan started by schemathesis, ready. Schemathesis ends every
    lifespan it started when each test item ends, so each operation's item starts it again
    (the item matrix then comes from Redis)."""
    with asgi.get_client(api_app) as client:
        wait_ready(client)  # type: ignore[arg-type]
    return api_app


# The schema of the app's own /openapi.json (it depends on no setting). Loaded from a bare app
# at import, since schemathesis.pytest.from_fixture does not run on this pytest; every case is
# sent to the started app above.
schema = schemathesis.openapi.from_dict(create_app(Settings(model_store=Path("unused"))).openapi())


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_driven_requests_never_fail(case: Any, started_api: FastAPI) -> None:
    """Positive and negative cases generated from /openapi.json: every answer is below 500,
    every error carries the error shape, and what is documented matches the schema."""
    response = case.call(app=started_api)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


def test_the_schema_tested_is_the_one_served(api_app: FastAPI) -> None:
    served = TestClient(api_app).get("/openapi.json")  # no lifespan needed for the schema
    assert served.status_code == 200
    assert served.json() == schema.raw_schema


# ---- bodies: size, type, syntax, depth ---------------------------------------------------------


@pytest.fixture(scope="module")
def small(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    """An app taking bodies of at most SMALL_LIMIT bytes."""
    with started_client(make_settings(model_store, redis_url,
                                      max_body_bytes=SMALL_LIMIT)) as client:
        yield client


@pytest.fixture(scope="module")
def client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    """An app with the default limits (4 MiB bodies)."""
    with started_client(make_settings(model_store, redis_url,
                                      redis_prefix=unique_prefix("hostile"))) as started:
        yield started


def error_counts(client: TestClient) -> dict[str, float]:
    """recsys_errors_total by code."""
    return {labels["code"]: value for name, labels, value
            in metric_samples(client.get("/metrics").text, "recsys_errors")
            if name == "recsys_errors_total"}


def oversized() -> bytes:
    ids = ",".join(f'"i{n}"' for n in range(1, 600))
    body = f'{{"user": {{"id": "u1"}}, "item_ids": [{ids}]}}'.encode()
    assert len(body) > SMALL_LIMIT
    return body


@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend", "/v1/admin/reload"])
def test_body_over_the_limit_with_content_length(small: TestClient, path: str) -> None:
    response = small.post(path, content=oversized(), headers=JSON)
    message = assert_error(response, 413, "payload_too_large")
    assert str(SMALL_LIMIT) in message


@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_body_over_the_limit_chunked(small: TestClient, path: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """No Content-Length to trust: the bytes are counted as they arrive."""
    body = oversized()
    before = error_counts(small)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start:start + 256]

    with caplog.at_level(logging.WARNING):
        response = small.post(path, content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_error(response, 413, "payload_too_large")
    # One refusal, counted once as what it is: not also a bad_request, not an internal error,
    # and no error (with a traceback) in the log for a client's mistake.
    after = error_counts(small)
    assert {code: n - before.get(code, 0.0) for code, n in after.items()
            if n != before.get(code, 0.0)} == {"payload_too_large": 1.0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    ok_json(small.post("/v1/score", json=SCORE_BODY))


def test_body_at_the_limit_is_served(small: TestClient) -> None:
    body = b'{"user": {"id": "u1"}, "item_ids": ["i1"]}'
    padded = body[:-1] + b" " * (SMALL_LIMIT - len(body)) + b"}"
    assert len(padded) == SMALL_LIMIT
    ok_json(small.post("/v1/score", content=padded, headers=JSON))


@pytest.mark.parametrize(("headers", "content"), [
    ({"content-type": "text/plain"}, b'{"item_ids": ["i1"]}'),
    ({"content-type": "application/x-www-form-urlencoded"}, b"item_ids=i1&item_ids=i2"),
    ({"content-type": "multipart/form-data; boundary=x"},
     b'--x\r\nContent-Disposition: form-data; name="item_ids"\r\n\r\ni1\r\n--x--\r\n'),
    ({"content-type": "application/xml"}, b"<item_ids><id>i1</id></item_ids>"),
    ({"content-type": "application/jsonx"}, b'{"item_ids": ["i1"]}'),
    ({}, b'{"item_ids": ["i1"]}'),
])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_wrong_content_type(client: TestClient, path: str, headers: dict[str, str],
                            content: bytes) -> None:
    response = client.post(path, content=content, headers=headers)
    if not headers:
        assert "content-type" not in response.request.headers
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON", "application/problem+json"])
def test_json_content_types_are_accepted(client: TestClient, content_type: str) -> None:
    response = client.post("/v1/score", content=b'{"item_ids": ["i1"]}',
                           headers={"content-type": content_type})
    assert ok_json(response)["scores"][0]["item_id"] == "i1"


DEPTH = 100_000


@pytest.mark.parametrize("body", [
    b"[" * DEPTH + b"]" * DEPTH,
    b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    b'{"user": {"features": {"age": ' + b"[" * DEPTH + b"]" * DEPTH + b'}}, "item_ids": []}',
    b'{"item_ids": ["i1"], "user": {"id": ' + b'{"x":' * DEPTH + b"1" + b"}" * DEPTH + b"}}",
    b'{"k": 3, "filters": {"genre": ' + b"[" * 900 + b"]" * 900 + b"}}",
], ids=["arrays", "objects", "feature", "user_id", "parsable_depth"])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_deeply_nested_json(client: TestClient, path: str, body: bytes) -> None:
    assert_client_error(client.post(path, content=body, headers=JSON))
    ok_json(client.post("/v1/score", json=SCORE_BODY))  # and the service is fine afterwards


@pytest.mark.parametrize("body", [
    b'{"k": NaN}', b'{"k": Infinity}', b'{"k": 1e400}', b'{"k": -1e400}', b'{"k": 1e2}',
    b'{"k": 10000000000000000000000000000000000000000}',
    b'{"item_ids": [NaN]}', b'{"item_ids": ["i1"], "user": {"id": Infinity}}',
    b'NaN', b'1e400', b'{"exclude_seen": NaN}',
])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/recommend"])
def test_non_finite_numbers_outside_features(client: TestClient, path: str,
                                             body: bytes) -> None:
    assert_error(client.post(path, content=body, headers=JSON), 422)


@pytest.mark.parametrize("content", [
    b"\x00\x01\x02", b'{"item_ids": ["i1"]}\x00', b'{"item_ids": ["i1"]} {"item_ids": []}',
    b'{"item_ids": ["\xc3\x28"]}', b"\xef\xbb\xbf" + b'{"item_ids": ["i1"]}',
    b'{"item_ids": ["i1"], "item_ids": ["i2"]}',
])
def test_odd_bytes_are_client_errors(client: TestClient, content: bytes) -> None:
    response = client.post("/v1/score", content=content, headers=JSON)
    if response.status_code != 200:
        assert_client_error(response)


# ---- ids that look like Redis syntax address no key --------------------------------------------

REDIS_SYNTAX = ["*", "?", "[a-z]", "{", "}", "{default:1:x}", ":", "recsys:*", "a b",
                "\n", "\r\n", "\r\n*3\r\n$3\r\nDEL\r\n$1\r\n*\r\n", "*1\r\n$8\r\nFLUSHALL\r\n",
                "\\x00", "\x00", "$-1", "%7B", "users", "items:manifest", "..", "🙂"]


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, tuple[bytes, str]]:
    """Every key under the prefix with its type and a digest of its value."""
    state = {}
    for key in keys_under(client, prefix):
        kind = client.type(key)
        if kind == b"string":
            value = client.get(key) or b""
        elif kind == b"hash":
            value = b"".join(k + b"=" + v for k, v in sorted(client.hgetall(key).items()))
        else:
            value = kind
        state[key] = (kind, hashlib.sha256(value).hexdigest())
    return state


def test_redis_syntax_in_ids_addresses_no_key(client: TestClient, redis_url: str) -> None:
    prefix = client.app.state.settings.redis_prefix  # type: ignore[attr-defined]
    redis_client = redis.Redis.from_url(redis_url)
    try:
        before = snapshot(redis_client, prefix)
        assert any(key.endswith(b":items:manifest") for key in before), before.keys()
        assert any(key.endswith(b":users") for key in before), before.keys()
        for hostile in REDIS_SYNTAX:
            user = {"id": hostile, "features": {"gender": hostile, "country": hostile}}
            headers = {"X-Request-ID": hostile.encode("unicode_escape").decode()[:128]}
            responses = [
                client.post("/v1/score", json={"user": user, "item_ids": [hostile, "i1"]},
                            headers=headers),
                client.post("/v1/recommend", json={
                    "user": user, "exclude_item_ids": [hostile],
                    "filters": {"genre": [hostile]}}, headers=headers),
                client.post("/v1/recommend", json={"user": user, "filters": {hostile: ["x"]}}),
                client.post("/v1/admin/reload", headers=headers),
                client.get("/v1/model", params={"id": hostile}),
            ]
            for response in responses:
                assert response.status_code < 500, (hostile, response.text)
        after = snapshot(redis_client, prefix)
    finally:
        redis_client.close()
    assert after == before, {"new": sorted(set(after) - set(before)),
                             "deleted": sorted(set(before) - set(after)),
                             "changed": sorted(k for k in before.keys() & after.keys()
                                               if before[k] != after[k])}
