"""Structured logs: JSON lines carrying the request id; secrets and features never logged."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.serving.logs import configure_logging

from .helpers import make_settings, started_client


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_with_request_id(json_logs, model_store: Path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(model_store, redis_url, api_key="s3cret-key")
    with started_client(settings) as client:
        client.post("/v1/score", headers={"X-Request-ID": "req-42", "X-API-Key": "s3cret-key"},
                    json={"user": {"id": "u1", "features": {"country": "SECRET-COUNTRY"}},
                          "item_ids": ["i1"]})
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()
             if line.startswith("{")]
    access = [r for r in lines if r.get("name") == "service.access"]
    assert any(r["request_id"] == "req-42" and "/v1/score" in r["message"] for r in access)
    assert all({"time", "level", "name", "message"} <= set(r) for r in lines)
    text = json.dumps(lines)
    assert "s3cret-key" not in text and "SECRET-COUNTRY" not in text
