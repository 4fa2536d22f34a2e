"""A small closed-loop HTTP/1.1 load generator for the serving benchmark (bench/serving.py).

Runs in its own process so that the client never shares an interpreter with what it measures.
C keep-alive connections each send one request, read the whole response, send the next; the
request bodies are encoded before the clock starts, and the client uses raw asyncio streams
(no HTTP library) to keep its own CPU cost low on a shared 2-core machine.

    .venv/bin/python bench/loadgen.py --port 8000 --kind recommend --concurrency 32 --duration 10

Prints one JSON object on stdout: count, errors (non-200 statuses and exceptions, by kind),
throughput, latency percentiles (ms) of the requests sent inside the measured window (after
--warmup), a check of a sample of responses (JSON-parsed, the expected keys present) and where
the machine's CPU went during the window (in cores: the processes of --watch-pid, this client,
everything else), so that a shared machine's noise is visible beside the figures.
Only 127.0.0.1 is reached; every loop is bounded by a request cap and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
MAX_REQUESTS_PER_CONNECTION = 2_000_000
MAX_HEADER_BYTES = 64 * 1024
BODIES = 4096  # distinct pre-encoded bodies, cycled through
CHECK_EVERY = 97  # JSON-parse one response in this many (and the first of each connection)


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    count: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    check_failures: dict[str, int] = field(default_factory=dict)
    results_per_response: list[int] = field(default_factory=list)
    sample: Any = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def build_bodies(kind: str, users: int, items: int, k: int, n_items: int, seed: int,
                 count: int = BODIES) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        user = {"id": f"u{rng.randint(1, users)}"}
        if kind == "recommend":
            body: dict[str, Any] = {"user": user, "k": k}
        else:
            body = {"user": user, "item_ids": [f"i{rng.randint(1, items)}"
                                               for _ in range(n_items)]}
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


def encode_requests(path: str, port: int, bodies: list[bytes]) -> list[bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Content-Type: application/json\r\nConnection: keep-alive\r\n")
    return [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("response headers too large")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    keep_alive = True
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        for _ in range(100_000):
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), keep_alive
    if length is None:
        raise ValueError("response without Content-Length")
    body = await reader.readexactly(length) if length else b""
    return status, body, keep_alive


def check(stats: Stats, kind: str, body: bytes) -> None:
    stats.checked += 1
    try:
        payload = json.loads(body)
        key = "items" if kind == "recommend" else "scores"
        results = payload[key]
        if not isinstance(results, list) or not isinstance(payload["model"]["version"], int):
            raise TypeError(key)
        for entry in results[:3]:
            if not isinstance(entry["item_id"], str) or not math.isfinite(entry["score"]):
                raise ValueError("bad entry")
        stats.results_per_response.append(len(results))
        if stats.sample is None:
            stats.sample = {key: results[:2], "model": payload["model"]}
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:60]}"
        stats.check_failures[reason] = stats.check_failures.get(reason, 0) + 1


async def connection(index: int, port: int, kind: str, requests: list[bytes], stats: Stats,
                     measure_from: float, stop_at: float) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    position = (index * 7919) % len(requests)
    first = True
    try:
        for n in range(MAX_REQUESTS_PER_CONNECTION):
            started = time.perf_counter()
            if started >= stop_at:
                return
            request = requests[(position + n) % len(requests)]
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                    started = time.perf_counter()
                assert reader is not None
                writer.write(request)
                status, body, keep_alive = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as exc:
                if started >= measure_from:
                    stats.error(type(exc).__name__)
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)  # no hot loop against a dead server
                continue
            finished = time.perf_counter()
            if not keep_alive:
                writer.close()
                reader = writer = None
            if started < measure_from:
                continue
            stats.count += 1
            stats.latencies.append(finished - started)
            if status != 200:
                stats.error(f"http {status}")
            elif first or n % CHECK_EVERY == 0:
                check(stats, kind, body)
                first = False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


class CpuWindow:
    """CPU seconds spent during the measured window: watched processes (and their children),
    this process, and the whole machine (busy, not idle or iowait)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start: tuple[float, float, float] | None = None
        self.end: tuple[float, float, float] | None = None

    def _read(self) -> tuple[float, float, float]:
        watched = 0.0
        try:
            import psutil
        except ImportError:
            return math.nan, time.process_time(), math.nan
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        times = proc.cpu_times()
                        watched += times.user + times.system
        machine = psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return watched, time.process_time(), busy

    async def mark(self, at: float, start: bool) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        if start:
            self.start = self._read()
        else:
            self.end = self._read()

    def cores(self, seconds: float) -> dict[str, float | None]:
        if self.start is None or self.end is None:
            return {}
        server, client, busy = (round((b - a) / seconds, 2)
                                for a, b in zip(self.start, self.end, strict=True))
        other = round(max(0.0, busy - client - server), 2) if self.pids else None
        return {"server": server if self.pids else None, "client": client,
                "machine_busy": busy, "other": other}


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = build_bodies(args.kind, args.users, args.items, args.k, args.score_items, args.seed)
    path = "/v1/recommend" if args.kind == "recommend" else "/v1/score"
    requests = encode_requests(path, args.port, bodies)
    stats = Stats()
    now = time.perf_counter()
    measure_from = now + args.warmup
    stop_at = measure_from + args.duration
    cpu = CpuWindow(args.watch_pid)
    marks = [asyncio.create_task(cpu.mark(measure_from, True)),
             asyncio.create_task(cpu.mark(stop_at, False))]
    tasks = [asyncio.create_task(connection(i, args.port, args.kind, requests, stats,
                                            measure_from, stop_at))
             for i in range(args.concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=args.warmup + args.duration
                                       + args.request_timeout)
    for task in pending:  # requests still outstanding past the timeout count as errors
        task.cancel()
        stats.error("timeout")
    if pending:
        await asyncio.wait(pending, timeout=5)
    await asyncio.wait(marks, timeout=5)
    for task in done:
        exc = task.exception()
        if exc is not None:
            stats.error(f"task {type(exc).__name__}")
    ordered = sorted(stats.latencies)
    errors = sum(stats.errors.values())

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    per_response = stats.results_per_response
    return {
        "kind": args.kind, "path": path, "concurrency": args.concurrency,
        "duration_s": args.duration, "warmup_s": args.warmup,
        "count": stats.count, "errors": errors, "errors_by_kind": stats.errors,
        "throughput_rps": round(stats.count / args.duration, 1),
        "p50_ms": ms(percentile(ordered, 50)), "p90_ms": ms(percentile(ordered, 90)),
        "p99_ms": ms(percentile(ordered, 99)), "max_ms": ms(ordered[-1] if ordered else None),
        "mean_ms": ms(sum(ordered) / len(ordered) if ordered else None),
        "checked": stats.checked, "check_failures": stats.check_failures,
        "results_per_response": {"min": min(per_response, default=None),
                                 "max": max(per_response, default=None)},
        "sample": stats.sample,
        "cpu_cores": cpu.cores(args.duration),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    parser.add_argument("--kind", choices=("recommend", "score"), default="recommend")
    parser.add_argument("--concurrency", type=int, default=1, help="keep-alive connections")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--users", type=int, default=50_000, help="users u1..uN")
    parser.add_argument("--items", type=int, default=100_000, help="items i1..iN (score)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--score-items", type=int, default=100, help="item ids per score body")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="grace after the window for outstanding requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--watch-pid", type=int, action="append", default=[],
                        help="a server process whose CPU (with its children's) to report")
    args = parser.parse_args(argv)
    if not (1 <= args.concurrency <= 1024 and 0 < args.duration <= 3600
            and 0 <= args.warmup <= 600):
        parser.error("--concurrency in [1, 1024], --duration in (0, 3600], --warmup in [0, 600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop  # a faster event loop when installed (uvicorn[standard] brings it)
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
