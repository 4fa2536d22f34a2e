"""Graceful shutdown of a real `recsys-serve` process: SIGTERM while requests are in flight ->
every request the server accepted completes with 200 (none is cut), and the process exits 0
within 30 s.

"Accepted" is judged by the server itself: its JSON access log names every request that entered
the app (with the X-Request-ID each client request carries, and the status it got; a request
cancelled mid-way would be logged as 500). Requests whose body is still uploading when SIGTERM
arrives are in flight by construction.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import redis_db_url, serve_process, server_env

STOP_TIMEOUT_S = 30.0
SHUTDOWN_DB = 7  # a database of the session Redis that no other test uses
SLOW_REQUESTS = 4
HAMMERS = 4


@dataclass
class Sent:
    request_id: str
    started: float
    status: int | None = None
    body: object = None
    error: str | None = None


def slow_body(parts: list[bytes], pause_s: float) -> Iterator[bytes]:
    """A chunked upload that takes len(parts) - 1 pauses to finish."""
    for n, part in enumerate(parts):
        if n:
            time.sleep(pause_s)
        yield part


def access_log(text: str) -> dict[str, int]:
    """request id -> status, from the server's JSON access lines."""
    statuses: dict[str, int] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # uvicorn's own lines are not JSON
        if isinstance(record, dict) and record.get("name") == "service.access":
            status = int(record["message"].split()[2])
            statuses[record["request_id"]] = status
    return statuses


@pytest.mark.timeout(240)
def test_sigterm_lets_accepted_requests_finish(tmp_path: Path, model_store: Path,
                                               redis_url: str) -> None:
    env = server_env(model_store, redis_db_url(redis_url, SHUTDOWN_DB), RECSYS_LOG_FORMAT="json")
    log_path = tmp_path / "server.log"
    sent: list[Sent] = []
    slow_sent: list[Sent] = []
    lock = threading.Lock()
    stop = threading.Event()
    with serve_process(env, log_path) as server:
        base_url = f"http://127.0.0.1:{server.port}"

        def request(client: httpx.Client, path: str, content: object) -> Sent:
            record = Sent(f"shutdown-{uuid.uuid4().hex}", time.monotonic())
            with lock:
                sent.append(record)
            try:
                response = client.post(path, content=content,  # type: ignore[arg-type]
                                       headers={"content-type": "application/json",
                                                "x-request-id": record.request_id})
                record.status, record.body = response.status_code, response.json()
            except (httpx.HTTPError, ValueError) as exc:
                record.error = f"{type(exc).__name__}: {exc}"
            return record

        def slow(n: int) -> None:
            parts = [b'{"user": {"id": "u%d"},' % (n + 1), b' "k": 10,', b' "exclude_seen": true}']
            with httpx.Client(base_url=base_url, timeout=60.0) as client:
                slow_sent.append(request(client, "/v1/recommend", slow_body(parts, 1.0)))

        def hammer(n: int) -> None:
            # A new connection per request: one refused at connect was never accepted.
            limits = httpx.Limits(max_keepalive_connections=0)
            body = json.dumps({"user": {"id": f"u{n + 10}"}, "k": 20}).encode()
            with httpx.Client(base_url=base_url, timeout=60.0, limits=limits) as client:
                refused = 0
                while not stop.is_set() and refused < 3:
                    refused = refused + 1 if request(client, "/v1/recommend", body).error \
                        else 0

        hammers = [threading.Thread(target=hammer, args=(n,)) for n in range(HAMMERS)]
        slows = [threading.Thread(target=slow, args=(n,)) for n in range(SLOW_REQUESTS)]
        for thread in hammers + slows:
            thread.start()
        time.sleep(0.7)  # the slow uploads have started; the hammers are mid-stream
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        exited_after = time.monotonic() - sigterm_at
        stop.set()
        for thread in hammers + slows:
            thread.join(timeout=60)
        log = log_path.read_text(errors="replace")

    assert code == 0, f"exit code {code} {exited_after:.1f}s after SIGTERM; log:\n{log[-5000:]}"
    assert exited_after < STOP_TIMEOUT_S
    logged = access_log(log)
    assert logged, f"no JSON access lines in the log:\n{log[-3000:]}"
    assert len(slow_sent) == SLOW_REQUESTS
    for record in slow_sent:
        # Started before SIGTERM, finished uploading about 1.3 s after it: in flight.
        assert record.started < sigterm_at, record
        assert record.status == 200, record
        assert isinstance(record.body, dict) and len(record.body["items"]) == 10, record
        assert logged.get(record.request_id) == 200, record

    by_id = {s.request_id: s for s in sent}
    problems = []
    for request_id, status in logged.items():
        mine = by_id.get(request_id)
        if mine is None:
            continue
        if status != 200:
            problems.append(f"{request_id}: the server logged {status}")
        if mine.status != 200:
            problems.append(f"{request_id}: accepted, the client got {mine.status} "
                            f"{mine.error or mine.body}")
    for record in sent:
        if record.status is not None and record.status != 200:
            problems.append(f"{record.request_id}: answered {record.status} {record.body}")
        if record.error and record.started < sigterm_at - 0.5:
            problems.append(f"{record.request_id}: failed well before SIGTERM: {record.error}")
    assert not problems, "\n".join(problems[:20])
    completed = sum(1 for s in sent if s.status == 200)
    assert completed > SLOW_REQUESTS, "the hammers got answers before the shutdown"
