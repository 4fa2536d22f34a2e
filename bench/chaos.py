"""Chaos run against one real `recsys-serve` process under steady load (`make chaos`).

Trains a small synthetic model with `recsys-train`, starts a private Redis and one `recsys-serve`
on free loopback ports, then drives it from this process (asyncio + httpx) while a timeline of
events hits it, each `--phase-seconds` apart:

    baseline | kill redis (SIGKILL) | restart redis (same port, empty) | new version (2, a copy
    of 1, renamed into place; the poller must pick it up) | broken version (3, truncated
    variables; POST /v1/admin/reload must refuse it) | final phase

/readyz is sampled every 0.5 s. At the end the server gets SIGTERM and must exit 0. Prints one
table (per event: requests sent/failed and p50/p99 latency before, during and after it) and a
verdict; exits 1 when a request failed, readiness was ever non-200, version 3 was ever served,
version 2 never was, or the server did not exit 0 (2 when the setup itself failed).

    .venv/bin/python bench/chaos.py [--concurrency 8] [--phase-seconds 10] [--keep] [--json PATH]

Only loopback addresses are used; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from processes import clean_env, executable, tail

from service.redis_server import EmbeddedRedis, free_port

HOST = "127.0.0.1"
MODEL_NAME = "default"
REDIS_PREFIX = "recsys:"
USERS = 3000
ITEMS = 1000
TRAIN_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 120.0
READINESS_EVERY_S = 0.5
MAX_REQUESTS_PER_WORKER = 1_000_000
EVENTS = ("kill redis", "restart redis", "new version", "broken version")
KEY_RE = re.compile(r"\{(?P<name>[^:{}]+):(?P<version>\d+):(?P<fp>[^:{}]+)\}:(?P<rest>.+)\Z")


# ---- records ------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One request: send time (s since the load started), latency, outcome, version served."""

    t: float
    latency_s: float
    endpoint: str
    status: int | None
    error: str | None
    version: int | None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status != 200


@dataclass
class Probe:
    """One /readyz sample."""

    t: float
    status: int | None
    body_status: str | None
    version: int | None
    redis_ok: bool | None
    error: str | None = None


@dataclass
class Event:
    name: str
    t: float
    done_t: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    t0: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    redis_keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0


# ---- processes ----------------------------------------------------------------------------------


def train(store: Path, log_path: Path) -> None:
    command = [*executable("recsys-train", "service.training.cli"), "--data", "synthetic",
               "--synthetic-users", str(USERS), "--synthetic-items", str(ITEMS), "--epochs", "2",
               "--model-store", str(store), "--name", MODEL_NAME]
    started = time.monotonic()
    with log_path.open("wb") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
                                timeout=TRAIN_TIMEOUT_S, check=False)
    if result.returncode != 0 or not (store / MODEL_NAME / "1" / "saved_model.pb").is_file():
        raise RuntimeError(f"recsys-train exited {result.returncode}:\n{tail(log_path)}")
    print(f"  trained version 1 in {time.monotonic() - started:.0f}s", flush=True)


def start_server(port: int, store: Path, redis_url: str, log_path: Path
                 ) -> subprocess.Popen[bytes]:
    env = clean_env(RECSYS_MODEL_STORE=str(store), RECSYS_MODEL_NAME=MODEL_NAME,
                    RECSYS_REDIS_URL=redis_url, RECSYS_POLL_INTERVAL_S="2",
                    RECSYS_LOG_LEVEL="WARNING", OPENBLAS_NUM_THREADS="1")
    command = [*executable("recsys-serve", "service.serving.cli"), "--host", HOST,
               "--port", str(port)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(base_url: str, server: subprocess.Popen[bytes], log_path: Path) -> float:
    started = time.monotonic()
    deadline = started + READY_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"recsys-serve exited {server.returncode} before it was "
                                   f"ready:\n{tail(log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.1)
    raise RuntimeError(f"recsys-serve not ready after {READY_TIMEOUT_S:.0f}s:\n{tail(log_path)}")


def kill_redis(server: EmbeddedRedis) -> int | None:
    """SIGKILL the redis-server process (no shutdown, no goodbye), then drop its workdir."""
    process = server._process
    pid = process.pid if process is not None else None
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    server.stop()
    return pid


def stop_server(server: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGTERM, then wait up to STOP_TIMEOUT_S: (exit status or None when it hung, seconds)."""
    started = time.monotonic()
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


def redis_entries(port: int) -> dict[str, Any]:
    """Versions with an item-matrix manifest / a complete user table in the Redis on `port`."""
    found: dict[str, set[int]] = {"items_manifest": set(), "users_complete": set()}
    client = redis.Redis(host=HOST, port=port, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        for raw in client.scan_iter(match=f"{REDIS_PREFIX}*", count=1000):
            key = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            match = KEY_RE.search(key)
            if match is None:
                continue
            if match["rest"] == "items:manifest":
                found["items_manifest"].add(int(match["version"]))
            elif match["rest"] == "users:complete":
                found["users_complete"].add(int(match["version"]))
    except redis.RedisError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()
    return {kind: sorted(versions) for kind, versions in found.items()}


# ---- model store events -------------------------------------------------------------------------

def publish_copy(model_dir: Path, source: int, target: int, corrupt: bool = False) -> str:
    """Copies version `source` into a hidden directory beside it (optionally truncating its
    variables data to half), then renames it to `target` in one step."""
    hidden = Path(tempfile.mkdtemp(prefix=f".tmp-chaos-{target}-", dir=model_dir))
    staged = hidden / "v"
    shutil.copytree(model_dir / str(source), staged)
    truncated = []
    if corrupt:
        for data in sorted((staged / "variables").glob("variables.data-*")):
            size = data.stat().st_size
            os.truncate(data, size // 2)
            truncated.append(f"{data.name}: {size} -> {size // 2} bytes")
    os.rename(staged, model_dir / str(target))
    hidden.rmdir()
    return "; ".join(truncated) or "copied"


# ---- load ---------------------------------------------------------------------------------------

async def worker(run: Run, client: httpx.AsyncClient, rng: random.Random, stop: asyncio.Event,
                 deadline: float) -> None:
    for n in range(MAX_REQUESTS_PER_WORKER):
        if stop.is_set() or time.monotonic() >= deadline:
            return
        user = {"id": f"u{rng.randint(1, USERS)}"}
        if n % 5 == 4:
            endpoint = "/v1/score"
            body: dict[str, Any] = {"user": user, "item_ids": [
                f"i{rng.randint(1, ITEMS)}" for _ in range(10)]}
        else:
            endpoint = "/v1/recommend"
            body = {"user": user, "k": 10}
        sent = time.monotonic()
        status: int | None = None
        error: str | None = None
        version: int | None = None
        try:
            response = await client.post(endpoint, json=body)
            status = response.status_code
            try:
                payload = response.json()
            except ValueError:
                payload = None
            if status == 200 and isinstance(payload, dict):
                version = int(payload["model"]["version"])
            elif isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                error = str(payload["error"].get("code"))
            else:
                error = f"http {status}"
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            error = type(exc).__name__
        finished = time.monotonic()
        run.samples.append(Sample(sent - run.t0, finished - sent, endpoint, status, error,
                                  version))


async def sample_readiness(run: Run, client: httpx.AsyncClient, stop: asyncio.Event,
                           deadline: float) -> None:
    limit = int((deadline - time.monotonic()) / READINESS_EVERY_S) + 10
    for _ in range(limit):
        if stop.is_set() or time.monotonic() >= deadline:
            return
        started = time.monotonic()
        probe = Probe(started - run.t0, None, None, None, None)
        try:
            response = await client.get("/readyz")
            probe.status = response.status_code
            body = response.json()
            checks = body.get("checks", {})
            probe.body_status = body.get("status")
            probe.version = checks.get("model", {}).get("version")
            probe.redis_ok = checks.get("redis", {}).get("ok")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            probe.error = type(exc).__name__
        run.probes.append(probe)
        await asyncio.sleep(max(0.0, READINESS_EVERY_S - (time.monotonic() - started)))


async def timeline(run: Run, phase_s: float, model_dir: Path, redis_box: list[EmbeddedRedis],
                   redis_port: int, reload_client: httpx.AsyncClient) -> None:
    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t - run.now()))

    def begin(name: str) -> Event:
        event = Event(name, run.now())
        run.events.append(event)
        print(f"  t={event.t:5.1f}s  {name}", flush=True)
        return event

    async def redis_up_metric() -> str | None:
        """The service's own recsys_redis_up gauge, as /metrics says it now."""
        try:
            text = (await reload_client.get("/metrics")).text
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        return next((line.split()[-1] for line in text.splitlines()
                     if line.startswith("recsys_redis_up ")), None)

    await at(phase_s)
    event = begin("kill redis")
    event.detail["pid"] = kill_redis(redis_box[0])
    event.done_t = run.now()
    await at(1.5 * phase_s)
    event.detail["recsys_redis_up_mid_phase"] = await redis_up_metric()

    await at(2 * phase_s)
    event = begin("restart redis")
    redis_box[0] = await asyncio.to_thread(EmbeddedRedis(port=redis_port).start)
    event.detail["port"] = redis_port
    event.done_t = run.now()
    await at(2.5 * phase_s)
    event.detail["recsys_redis_up_mid_phase"] = await redis_up_metric()

    await at(3 * phase_s)
    # What the service has re-written to the new Redis one phase after it came back.
    run.redis_keys["before new version"] = await asyncio.to_thread(redis_entries, redis_port)
    event = begin("new version")
    event.detail["how"] = await asyncio.to_thread(publish_copy, model_dir, 1, 2)
    event.done_t = run.now()

    await at(4 * phase_s)
    event = begin("broken version")
    event.detail["how"] = await asyncio.to_thread(publish_copy, model_dir, 2, 3, True)
    event.done_t = run.now()
    started = time.monotonic()
    try:
        response = await reload_client.post("/v1/admin/reload")
        event.detail["reload_status"] = response.status_code
        event.detail["reload_body"] = response.text[:400]
    except httpx.HTTPError as exc:
        event.detail["reload_status"] = None
        event.detail["reload_body"] = f"{type(exc).__name__}: {exc}"
    event.detail["reload_seconds"] = round(time.monotonic() - started, 2)

    await at(5 * phase_s)


async def drive(run: Run, base_url: str, concurrency: int, phase_s: float, model_dir: Path,
                redis_box: list[EmbeddedRedis], redis_port: int, seed: int) -> None:
    stop = asyncio.Event()
    run.t0 = time.monotonic()
    deadline = run.t0 + 5 * phase_s + 60.0  # hard bound even if the timeline hangs
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S,
                                  limits=limits) as client,
                httpx.AsyncClient(base_url=base_url, timeout=5.0) as probe_client,
                httpx.AsyncClient(base_url=base_url, timeout=RELOAD_TIMEOUT_S) as reload_client):
        tasks = [asyncio.create_task(worker(run, client, random.Random(seed + i), stop,
                                            deadline)) for i in range(concurrency)]
        tasks.append(asyncio.create_task(sample_readiness(run, probe_client, stop, deadline)))
        try:
            await asyncio.wait_for(timeline(run, phase_s, model_dir, redis_box, redis_port,
                                            reload_client),
                                   timeout=5 * phase_s + 45.0)
        finally:
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5.0)
            for task in pending:
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    raise RuntimeError("a load task failed") from task.exception()


# ---- summary ------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def window(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    chosen = [s for s in samples if start <= s.t < end]
    latencies = [s.latency_s for s in chosen]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {"from_s": round(start, 2), "to_s": round(end, 2), "sent": len(chosen),
            "failed": sum(s.failed for s in chosen),
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "max_ms": None if not latencies else round(max(latencies) * 1000, 1)}


def log_excerpt(path: Path, limit: int = 25) -> tuple[int, list[str]]:
    lines = tail(path, 2_000_000).splitlines()
    noteworthy = [line for line in lines if re.search(
        r"WARNING|ERROR|CRITICAL|Traceback|Exception|Error:", line)]
    distinct: list[str] = []
    for line in noteworthy:
        short = line[:240]
        if short not in distinct:
            distinct.append(short)
    return len(noteworthy), distinct[:limit]


def summarize(run: Run, phase_s: float, exit_code: int | None, stop_s: float,
              ready_s: float, log_path: Path, metrics_text: str) -> dict[str, Any]:
    samples = sorted(run.samples, key=lambda s: s.t)
    half = phase_s / 2
    events = []
    for event in run.events:
        events.append({"event": event.name, "t": round(event.t, 2),
                       "took_s": round(event.done_t - event.t, 3), "detail": event.detail,
                       "before": window(samples, event.t - half, event.t),
                       "during": window(samples, event.t, event.t + half),
                       "after": window(samples, event.t + half, event.t + phase_s)})
    versions: dict[str, dict[str, Any]] = {}
    for s in samples:
        if s.version is None:
            continue
        seen = versions.setdefault(str(s.version), {"first_s": s.t, "last_s": s.t, "count": 0})
        seen["first_s"] = min(seen["first_s"], s.t)
        seen["last_s"] = max(seen["last_s"], s.t + s.latency_s)
        seen["count"] += 1
    for seen in versions.values():
        seen["first_s"], seen["last_s"] = round(seen["first_s"], 2), round(seen["last_s"], 2)
    new_version = next((e for e in run.events if e.name == "new version"), None)
    pickup = None
    if new_version is not None and "2" in versions:
        first_v2 = min(s.t + s.latency_s for s in samples if s.version == 2)
        pickup = round(first_v2 - new_version.t, 2)
    readiness: dict[str, int] = {}
    for p in run.probes:
        label = f"{p.status} {p.body_status}" if p.status is not None else f"error {p.error}"
        readiness[label] = readiness.get(label, 0) + 1
    bad_probes = [asdict(p) for p in run.probes if p.status != 200][:10]
    transitions: list[list[Any]] = []
    for p in run.probes:
        label = (f"{p.body_status} (v{p.version})" if p.status == 200
                 else f"{p.status} {p.body_status or p.error}")
        if not transitions or transitions[-1][1] != label:
            transitions.append([round(p.t, 1), label])
    errors: dict[str, int] = {}
    for s in samples:
        if s.failed:
            label = f"{s.endpoint} {s.status} {s.error}"
            errors[label] = errors.get(label, 0) + 1
    failed = sum(s.failed for s in samples)
    duration = max((s.t + s.latency_s for s in samples), default=0.0)
    redis_state = run.redis_keys
    restart = next((e for e in run.events if e.name == "restart redis"), None)
    served_at_restart = None
    if restart is not None:
        before = [s.version for s in samples if s.version is not None and s.t <= restart.t]
        served_at_restart = before[-1] if before else None
    served_at_end = next((s.version for s in reversed(samples) if s.version is not None), None)
    count, excerpt = log_excerpt(log_path)
    metric_lines = [line for line in metrics_text.splitlines() if re.match(
        r"recsys_(item_matrix_loads_total|model_loads_total|model_refusals_total|redis_up|"
        r"errors_total|model_info)", line)]
    return {
        "phase_seconds": phase_s,
        "ready_after_s": round(ready_s, 1),
        "events": events,
        "totals": {"sent": len(samples), "failed": failed,
                   "failure_rate": round(failed / len(samples), 6) if samples else None,
                   "throughput_rps": round(len(samples) / duration, 1) if duration else None,
                   **{k: v for k, v in window(samples, 0.0, float("inf")).items()
                      if k.endswith("_ms")}},
        "failures_by_kind": errors,
        "versions": versions,
        "new_version_pickup_s": pickup,
        "readiness": readiness,
        "readiness_non_200": bad_probes,
        "readiness_timeline": transitions,
        "redis": {
            "served_at_restart": served_at_restart,
            "served_at_end": served_at_end,
            "entries": redis_state,
            "rewritten_before_new_version": served_at_restart in redis_state.get(
                "before new version", {}).get("items_manifest", []),
            "current_present_at_end": served_at_end in redis_state.get(
                "end", {}).get("items_manifest", []),
        },
        "server_exit": exit_code,
        "server_stop_s": round(stop_s, 2),
        "server_log_noteworthy_lines": count,
        "server_log_excerpt": excerpt,
        "metrics": metric_lines,
    }


def verdict(summary: dict[str, Any]) -> list[str]:
    problems = []
    if summary["totals"]["failed"]:
        problems.append(f"{summary['totals']['failed']} requests failed")
    if summary["readiness_non_200"]:
        problems.append(f"readiness was non-200 {len(summary['readiness_non_200'])}+ times")
    if "3" in summary["versions"]:
        problems.append("the broken version 3 was served")
    if "2" not in summary["versions"]:
        problems.append("version 2 was never served")
    if summary["server_exit"] != 0:
        problems.append(f"the server exited {summary['server_exit']} on SIGTERM "
                        "(None: still running after 30s)")
    return problems


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def print_table(summary: dict[str, Any]) -> None:
    def cell(w: dict[str, Any]) -> str:
        return f"{w['sent']:>5} {w['failed']:>4} {fmt(w['p50_ms']):>7} {fmt(w['p99_ms']):>7}"

    head = f"{'sent':>5} {'fail':>4} {'p50ms':>7} {'p99ms':>7}"
    print()
    print(f"{'event':<15} {'t(s)':>5} | {'before':^26} | {'during':^26} | {'after':^26}")
    print(f"{'':<15} {'':>5} | {head} | {head} | {head}")
    print("-" * 105)
    for e in summary["events"]:
        print(f"{e['event']:<15} {e['t']:>5.1f} | {cell(e['before'])} | {cell(e['during'])} | "
              f"{cell(e['after'])}")
    print("-" * 105)
    t = summary["totals"]
    print(f"totals: sent {t['sent']}, failed {t['failed']} (rate {fmt(t['failure_rate'])}), "
          f"{fmt(t['throughput_rps'])} req/s, p50 {fmt(t['p50_ms'])} ms, "
          f"p99 {fmt(t['p99_ms'])} ms, max {fmt(t['max_ms'])} ms")
    if summary["failures_by_kind"]:
        print("failures: " + ", ".join(f"{k} x{v}" for k, v in
                                       summary["failures_by_kind"].items()))
    print("versions served: " + ", ".join(
        f"v{v}: {s['first_s']}s..{s['last_s']}s ({s['count']} answers)"
        for v, s in sorted(summary["versions"].items(), key=lambda kv: int(kv[0]))))
    print(f"new version picked up {fmt(summary['new_version_pickup_s'])}s after it appeared")
    broken = next((e for e in summary["events"] if e["event"] == "broken version"), None)
    if broken is not None:
        print(f"reload after broken version: HTTP {fmt(broken['detail'].get('reload_status'))} "
              f"in {broken['detail'].get('reload_seconds')}s: "
              f"{broken['detail'].get('reload_body', '')[:200]}")
    print("readiness seen: " + ", ".join(f"{k} x{v}" for k, v in summary["readiness"].items()))
    print("readiness over time: " + ", ".join(f"{t}s {label}"
                                              for t, label in summary["readiness_timeline"]))
    print("recsys_redis_up half a phase after: " + ", ".join(
        f"{e['event']} = {fmt(e['detail'].get('recsys_redis_up_mid_phase'))}"
        for e in summary["events"] if "recsys_redis_up_mid_phase" in e["detail"]))
    r = summary["redis"]
    print(f"redis after restart: served version at restart {fmt(r['served_at_restart'])}; "
          f"entries one phase later {r['entries'].get('before new version')}; "
          f"at end {r['entries'].get('end')}")
    print(f"redis rewritten: version {fmt(r['served_at_restart'])} before the new version: "
          f"{'yes' if r['rewritten_before_new_version'] else 'NO'}; "
          f"version {fmt(r['served_at_end'])} (served at end) present at end: "
          f"{'yes' if r['current_present_at_end'] else 'NO'}")
    print(f"server exit on SIGTERM: {fmt(summary['server_exit'])} "
          f"after {summary['server_stop_s']}s")
    print(f"server log: {summary['server_log_noteworthy_lines']} warning/error lines")
    for line in summary["server_log_excerpt"][:12]:
        print(f"  | {line}")


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="load workers (default 8)")
    parser.add_argument("--phase-seconds", type=float, default=10.0,
                        help="seconds between timeline events (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", type=Path, help="write the raw summary here")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the load")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or not 1.0 <= args.phase_seconds <= 600.0:
        parser.error("--concurrency must be >= 1 and --phase-seconds in [1, 600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="recsys-chaos-"))
    store = workdir / "store"
    log_path = workdir / "serve.log"
    redis_box: list[EmbeddedRedis] = []
    server: subprocess.Popen[bytes] | None = None
    run = Run()
    try:
        print(f"chaos run in {workdir}", flush=True)
        try:
            train(store, workdir / "train.log")
            redis_box.append(EmbeddedRedis().start())
            redis_port = redis_box[0].port
            port = free_port()
            base_url = f"http://{HOST}:{port}"
            server = start_server(port, store, redis_box[0].url, log_path)
            ready_s = wait_ready(base_url, server, log_path)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"setup failed: {exc}", file=sys.stderr)
            return 2
        print(f"  recsys-serve ready on {base_url} after {ready_s:.1f}s (redis on port "
              f"{redis_port}); load: {args.concurrency} workers, phases of "
              f"{args.phase_seconds:g}s", flush=True)
        asyncio.run(drive(run, base_url, args.concurrency, args.phase_seconds,
                          store / MODEL_NAME, redis_box, redis_port, args.seed))
        run.redis_keys["end"] = redis_entries(redis_port)
        metrics_text = ""
        with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=base_url,
                                                               timeout=5.0) as client:
            metrics_text = client.get("/metrics").text
        exit_code, stop_s = stop_server(server)
        summary = summarize(run, args.phase_seconds, exit_code, stop_s, ready_s, log_path,
                            metrics_text)
        problems = verdict(summary)
        summary["problems"] = problems
        print_table(summary)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"summary written to {args.json}")
        print("RESULT: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
        return 1 if problems else 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=10)
        for embedded in redis_box:
            embedded.stop()
        if args.keep:
            print(f"kept {workdir} (serve.log, train.log, store/)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
