"""Shared pieces of the reliability tests: writable store copies, versions published the way an
exporter publishes them, background traffic that records every outcome, metric readers, real
server processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.redis_server import EmbeddedRedis, free_port
from tests.serving.helpers import Server, metric_samples, serve_command, unique_prefix, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "default"


# ---- the model store ---------------------------------------------------------------------------


def copy_store(model_store: Path, dest: Path) -> Path:
    """A writable copy of the (read-only) session store; returns the new store root."""
    shutil.copytree(model_store, dest)
    return dest


@pytest.fixture
def store(tmp_path: Path, model_store: Path) -> Path:
    return copy_store(model_store, tmp_path / "store")


def publish_version(model_dir: Path, number: int, source: Path | None = None,
                    change: Callable[[Path], None] | None = None) -> Path:
    """Writes version `number` as an exporter does: a full copy of `source` (default: version 1)
    in a hidden temporary directory, changed by `change`, then renamed into place at once."""
    staging = model_dir / f".tmp-{number}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source or model_dir / "1", staging)
    if change is not None:
        change(staging)
    target = model_dir / str(number)
    os.rename(staging, target)
    return target


def next_version(model_dir: Path) -> int:
    return max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0) + 1


# ---- metrics -----------------------------------------------------------------------------------


def metric(text: str, family: str, sample: str | None = None, **labels: str) -> float:
    """The sum of one family's samples (named `sample`, default `<family>_total` for counters
    and the family itself for gauges) whose labels include `labels`."""
    found = [(name, lbls, value) for name, lbls, value in metric_samples(text, family)
             if all(lbls.get(k) == v for k, v in labels.items())]
    names = {sample} if sample else {f"{family}_total", family}
    return sum(value for name, _, value in found if name in names)


def read_metric(client: Any, family: str, **labels: str) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return metric(response.text, family, **labels)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.05) -> Any:
    """Polls until `condition()` is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


# ---- background traffic ------------------------------------------------------------------------


@dataclass
class Outcome:
    worker: str
    started: float
    finished: float
    status: int | None  # None: no HTTP answer (transport error)
    body: Any
    error: str | None = None


class Traffic:
    """One thread per named call, each repeating its call until stopped; every outcome kept.

    A call returns an httpx.Response (or raises: recorded as a transport error)."""

    def __init__(self, calls: dict[str, Callable[[], httpx.Response]],
                 pause_s: float = 0.0) -> None:
        self.calls = calls
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name, call), daemon=True)
                         for name, call in calls.items()]

    def _run(self, name: str, call: Callable[[], httpx.Response]) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = call()
            except Exception as exc:  # a dropped request is exactly what these tests look for
                outcome = Outcome(name, started, time.monotonic(), None, None,
                                  f"{type(exc).__name__}: {exc}")
            else:
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                outcome = Outcome(name, started, time.monotonic(), response.status_code, body)
            with self._lock:
                self.outcomes.append(outcome)
            if self.pause_s:
                time.sleep(self.pause_s)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "traffic threads did not stop"

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_count(self, worker: str, count: int, timeout_s: float = 30.0) -> None:
        wait_for(lambda: sum(o.worker == worker for o in self.snapshot()) >= count,
                 timeout_s, f"{count} answers for {worker}")


# ---- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A private Redis of this test alone: tests that kill or restart Redis use this one,
    never the session's."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.stop()


def keys_under(client: redis.Redis, prefix: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{prefix}*", count=1000))


def version_tag(prefix: str, fingerprint: str, version: int = 1) -> str:
    return f"{prefix}{{{MODEL}:{version}:{fingerprint}}}"


class SilentRedis:
    """A TCP server on loopback that accepts connections and never answers a byte: a Redis that
    hangs. Bounded in time: it closes everything after `lifetime_s` at the latest."""

    def __init__(self, lifetime_s: float = 120.0) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self._socket.settimeout(0.1)
        self.port: int = self._socket.getsockname()[1]
        self._deadline = time.monotonic() + lifetime_s
        self._stop = threading.Event()
        self._held: list[Any] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with contextlib.suppress(OSError):
                connection, _ = self._socket.accept()
                self._held.append(connection)  # held open, never read, never answered
        self._close()

    def _close(self) -> None:
        for connection in self._held:
            with contextlib.suppress(OSError):
                connection.close()
        with contextlib.suppress(OSError):
            self._socket.close()

    def __enter__(self) -> SilentRedis:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def connections(self) -> int:
        return len(self._held)


# ---- real server processes ---------------------------------------------------------------------


def server_env(store: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RECSYS_MODEL_STORE": str(store), "RECSYS_REDIS_URL": redis_url,
           "RECSYS_REDIS_PREFIX": unique_prefix("rel"), "RECSYS_POLL_INTERVAL_S": "0",
           "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "RECSYS_LOG_LEVEL": "INFO"}
    env.pop("RECSYS_API_KEY", None)
    env.update(extra)
    return env


@contextlib.contextmanager
def serve_process(env: dict[str, str], log_path: Path,
                  ready_timeout_s: float = 120.0) -> Iterator[Server]:
    """A real `recsys-serve` process, ready; killed at the end if it still runs."""
    port = free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(serve_command(port), cwd=REPO_ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, process, log_path)
    try:
        try:
            wait_ready(server.http, ready_timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nexit code {process.poll()}; log:\n"
                                 f"{server.log()}") from None
        yield server
    finally:
        server.http.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def redis_db_url(redis_url: str, db: int) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"
