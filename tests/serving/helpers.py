"""Helpers of the serving tests: started apps, readiness, the error shape, metrics parsing.

Every app gets its own Redis key prefix (unless a test passes one), so apps of different tests
never share cache entries unless a test means them to (same prefix, same store).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.redis_server import free_port
from service.serving.app import create_app
from service.settings import Settings

READY_TIMEOUT_S = 60.0


def unique_prefix(tag: str = "t") -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:12]}:"


def wait_ready(client: TestClient | httpx.Client, timeout_s: float = READY_TIMEOUT_S
               ) -> dict[str, Any]:
    """Polls /readyz until 200 (the model loads in the background); returns its body."""
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = client.get("/readyz")
        except httpx.TransportError:
            last = None
        if last is not None:
            assert last.status_code in (200, 503), last.text
            if last.status_code == 200:
                body: dict[str, Any] = last.json()
                return body
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s}s: "
                         f"{last.text if last is not None else 'no answer'}")


def make_settings(model_store: Path, redis_url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_store": model_store, "redis_url": redis_url,
                              "poll_interval_s": 0, "api_key": None,
                              "redis_prefix": unique_prefix()}
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def started_client(settings: Settings, wait: bool = True) -> Iterator[TestClient]:
    """A TestClient whose lifespan runs; waits until /readyz says ready (unless wait=False)."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        if wait:
            wait_ready(client)
        yield client


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """The contract's error body: {"error": {"code": str, "message": str}}; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def ok_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def metric_samples(text: str, family: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of one metric family in a Prometheus exposition."""
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples]


def item_matrix_loads(text: str) -> dict[str, float]:
    """recsys_item_matrix_loads_total by source (absent sources are missing)."""
    return {labels["source"]: value
            for name, labels, value in metric_samples(text, "recsys_item_matrix_loads")
            if name == "recsys_item_matrix_loads_total"}


# ---- real server processes -------------------------------------------------------------------

class Server:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port = port
        self.process = process
        self.log_path = log_path
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.http.post(path, json=body)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()


def serve_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("recsys-serve")
    if script.exists():
        return [str(script), "--port", str(port)]
    return [sys.executable, "-m", "service.serving.cli", "--port", str(port)]


def start_server(tmp: Path, model_store: Path, redis_url: str, tag: str,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Server:
    """A real `recsys-serve` on a free port over a copy of the store, its log in tmp; the
    caller stops it (Server.process)."""
    store = tmp / "store"
    shutil.copytree(model_store, store)
    environment = {**os.environ, "RECSYS_MODEL_STORE": str(store),
                   "RECSYS_REDIS_URL": redis_url, "RECSYS_REDIS_PREFIX": unique_prefix(tag),
                   "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    environment.pop("RECSYS_API_KEY", None)
    port = free_port()
    log_path = tmp / f"{tag}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([*serve_command(port), *args], env=environment,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    return Server(port, process, log_path)


@contextlib.contextmanager
def running_server(tmp: Path, model_store: Path, redis_url: str, tag: str,
                   env: dict[str, str] | None = None) -> Iterator[Server]:
    """start_server, ready to serve; terminated (and waited for) afterwards."""
    server = start_server(tmp, model_store, redis_url, tag, env)
    try:
        wait_ready(server.http, 120)
        yield server
    finally:
        server.http.close()
        server.process.terminate()
        server.process.wait(timeout=30)
