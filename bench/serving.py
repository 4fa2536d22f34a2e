"""Serving benchmark (`make bench`): starts what it needs, runs every scenario, prints one table.

Models are cached under bench/.store/: `synth100k` is trained with the real CLI when missing
(50k users, 100k items, 1 epoch: a few minutes), `synth1m/1` is derived from it (the same
SavedModel with a 1,000,000-row items.parquet: ids m1..m1000000, feature values sampled from the
100k table). A private Redis (flushed at start) backs `recsys-serve` subprocesses on free loopback
ports; load comes from bench/loadgen.py in a separate process (keep-alive connections, raw
asyncio HTTP/1.1, fixed duration after a warm-up).

Scenarios (--scenarios, default all):
    a  /v1/recommend k=10, 1 connection, 2 workers, batching on (the defaults)
    b  /v1/recommend k=10, 32 connections, 2 workers, batching on
    c  /v1/recommend k=10, 32 connections, 2 workers, batching off (RECSYS_BATCH_MAX_SIZE=1)
    d  /v1/recommend k=10, 8 connections, 2 workers, batching on
    e  /v1/score with 100 item ids, 1 connection, 2 workers
    f  the naive way, in this process, per request, against a's p50: (1) the item tower over the
       whole catalog, the user tower once, the head over every item; (2) literally the model on
       every (user, item) pair (user tower, item tower and head per pair)
    g  ready from Redis: a fresh 100k server while Redis holds its item matrix
    h  1M items: compute + write of the item matrix, ready time, recommend p50/p99 (1 and 32
       connections), peak RSS; then a second start that reads the matrix from Redis, and its
       peak RSS
    i  1M items with the approximate index (RECSYS_RETRIEVAL_INDEX=ivf): index build, recall@10
       against h's exact answers for 300 users, recommend p50/p99

    .venv/bin/python bench/serving.py [--duration 10] [--scenarios a,b,f] [--skip-1m]
                                      [--json PATH] [--keep]

Exit status: 0 when every figure meets its target, 1 when one misses it, 2 when the setup
failed. Only 127.0.0.1 is used; every loop is bounded in count and time; every process started
here is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/serving.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from processes import clean_env, executable, stop_tree, tail  # noqa: E402  (bench/ is on sys.path)

from service.model_format import (  # noqa: E402
    ASSETS_DIR,
    ITEMS_FILE,
    METADATA_FILE,
    USERS_FILE,
    version_dirs,
)
from service.redis_server import EmbeddedRedis, free_port  # noqa: E402

HOST = "127.0.0.1"
STORE = ROOT / "bench" / ".store"
LOADGEN = ROOT / "bench" / "loadgen.py"
NAME_100K = "synth100k"
NAME_1M = "synth1m"
USERS = 50_000
ITEMS = 100_000
ITEMS_1M = 1_000_000
TRAIN_TIMEOUT_S = 3600.0
READY_TIMEOUT_S = 240.0
READY_TIMEOUT_1M_S = 900.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
RSS_EVERY_S = 0.5
NAIVE_REQUESTS = 5
NAIVE_ITEM_BATCH = 8192
WARMUP_S = 2.0
GB = 1e9
MB = 1e6
ALL_SCENARIOS = "abcdefghi"
RECALL_USERS = 300
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+) \[[^\]]*\] (.*)$")


# ---- models -------------------------------------------------------------------------------------

def complete_versions(model_dir: Path) -> list[Path]:
    """Version directories (highest first) with a SavedModel and metadata.json."""
    return [p for _, p in version_dirs(model_dir)
            if (p / METADATA_FILE).is_file() and (p / "saved_model.pb").is_file()
            and (p / ASSETS_DIR / ITEMS_FILE).is_file()]


def publish(source: Path, model_dir: Path, number: int) -> Path:
    """Copies a version into a hidden directory beside the target, then renames it into place."""
    model_dir.mkdir(parents=True, exist_ok=True)
    hidden = Path(tempfile.mkdtemp(prefix=".tmp-bench-", dir=model_dir))
    try:
        shutil.copytree(source, hidden / "v")
        target = model_dir / str(number)
        os.rename(hidden / "v", target)
        return target
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def train_100k(log_path: Path) -> Path:
    command = [*executable("recsys-train", "service.training.cli"), "--data", "synthetic",
               "--synthetic-users", str(USERS), "--synthetic-items", str(ITEMS),
               "--epochs", "1", "--model-store", str(STORE), "--name", NAME_100K]
    print(f"training {NAME_100K} (a few minutes): {' '.join(command)}", flush=True)
    started = time.monotonic()
    printed = 0
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=clean_env(), cwd=ROOT)
        try:
            for _ in range(int(TRAIN_TIMEOUT_S / 5) + 1):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
                lines = log_path.read_text(errors="replace").splitlines()
                for line in lines[printed:]:
                    if not re.search(r"absl|oneDNN|^I0000|^W0000", line):
                        print(f"  | {line[:160]}", flush=True)
                printed = len(lines)
                if process.returncode is not None:
                    break
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    versions = complete_versions(STORE / NAME_100K)
    if process.returncode != 0 or not versions:
        raise RuntimeError(f"recsys-train exited {process.returncode}; see {log_path}")
    print(f"  trained {versions[0]} in {time.monotonic() - started:.0f}s", flush=True)
    return versions[0]


def ensure_100k(workdir: Path, copy_from: Path | None) -> Path:
    versions = complete_versions(STORE / NAME_100K)
    if versions:
        return versions[0]
    if copy_from is not None:
        if not (copy_from / METADATA_FILE).is_file():
            raise RuntimeError(f"--copy-100k-from {copy_from}: no {METADATA_FILE} there")
        print(f"copying {copy_from} to {STORE / NAME_100K / '1'}", flush=True)
        return publish(copy_from, STORE / NAME_100K, 1)
    return train_100k(workdir / "train.log")


def ensure_1m(source: Path) -> Path:
    """synth1m/1: `source` with a 1,000,000-row item table (ids m1..m1000000; every other
    column's values sampled, row-wise, from the 100k table), written aside then renamed."""
    import numpy as np
    import pandas as pd

    model_dir = STORE / NAME_1M
    versions = complete_versions(model_dir)
    if versions:
        return versions[0]
    print(f"deriving {model_dir / '1'} ({ITEMS_1M:,} items) from {source}", flush=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    hidden = Path(tempfile.mkdtemp(prefix=".tmp-bench-", dir=model_dir))
    try:
        staged = hidden / "v"
        shutil.copytree(source, staged)
        items_path = staged / ASSETS_DIR / ITEMS_FILE
        items = pd.read_parquet(items_path)
        rows = np.random.default_rng(0).integers(0, len(items), ITEMS_1M)
        big = items.iloc[rows].reset_index(drop=True)
        big["item_id"] = [f"m{n}" for n in range(1, ITEMS_1M + 1)]
        big = big[list(items.columns)]
        big.to_parquet(items_path, index=False)
        metadata = json.loads((staged / METADATA_FILE).read_text(encoding="utf-8"))
        metadata["item_count"] = ITEMS_1M
        (staged / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        target = model_dir / "1"
        os.rename(staged, target)
        return target
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


# ---- servers ------------------------------------------------------------------------------------

class RssSampler:
    """Peak RSS of every process of a server's tree (the uvicorn supervisor and its workers),
    sampled every RSS_EVERY_S in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(int(24 * 3600 / RSS_EVERY_S)):
            with contextlib.suppress(psutil.Error):
                for proc in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        if proc.pid not in self.role:
                            cmdline = " ".join(proc.cmdline())
                            self.role[proc.pid] = (
                                # uvicorn's own workers, or recsys-serve's SO_REUSEPORT ones
                                "worker" if "spawn_main" in cmdline
                                or "--reuse-port" in cmdline else
                                "tracker" if "resource_tracker" in cmdline else
                                "main" if proc.pid == self.root.pid else "other")
                        rss = proc.memory_info().rss
                        self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
            if self._stop.wait(RSS_EVERY_S):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def serving_now(self) -> tuple[list[int], list[int], list[int]]:
        """Current RSS, USS and file-backed RSS of the serving processes (as serving_peaks
        chooses them). USS is the memory only that process holds: RSS less the pages it
        shares, such as TensorFlow's library code, which every worker maps. File-backed pages
        (mostly that code) are the part that moves between runs and machines: the kernel maps
        neighbours of each page touched when they are in its page cache."""
        rss: dict[int, int] = {}
        uss: dict[int, int] = {}
        files: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for proc in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    memory = proc.memory_full_info()
                    rss[proc.pid], uss[proc.pid] = memory.rss, memory.uss
                    files[proc.pid] = memory.shared  # Linux: RssFile + RssShmem
        for pid, value in rss.items():
            self.peak[pid] = max(self.peak.get(pid, 0), value)
        return self._serving(rss), self._serving(uss), self._serving(files)

    def serving_peaks(self) -> list[int]:
        """Peak RSS of the processes that serve: the workers, or the main process when
        uvicorn runs the app in it (one worker)."""
        return self._serving(self.peak)

    def _serving(self, values: dict[int, int]) -> list[int]:
        workers = [v for pid, v in values.items() if self.role.get(pid) == "worker"]
        return sorted(workers, reverse=True) or [values.get(self.root.pid, 0)]


@dataclass
class Server:
    label: str
    name: str
    workers: int
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    started_wall: float
    started: float
    rss: RssSampler
    health_s: float | None = None
    ready_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"



def start_server(label: str, name: str, workers: int, redis_url: str, workdir: Path,
                 log_level: str = "WARNING", **settings: str) -> Server:
    port = free_port()
    env = clean_env(RECSYS_MODEL_STORE=str(STORE), RECSYS_MODEL_NAME=name,
                    RECSYS_REDIS_URL=redis_url, RECSYS_POLL_INTERVAL_S="0",
                    RECSYS_LOG_LEVEL=log_level, **settings)
    log_path = workdir / f"serve-{label}.log"
    command = [*executable("recsys-serve", "service.serving.cli"), "--host", HOST,
               "--port", str(port), "--workers", str(workers)]
    with log_path.open("wb") as log:
        started_wall, started = time.time(), time.monotonic()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT)
    return Server(label, name, workers, settings, port, log_path, process, started_wall,
                  started, RssSampler(process.pid))


def wait_ready(server: Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Polls /healthz (first 200: the app started) and /readyz (200: model and items ready)."""
    deadline = server.started + timeout_s
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        for _ in range(int(timeout_s / POLL_S) + 1):
            if time.monotonic() >= deadline:
                break
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.label}: recsys-serve exited "
                                   f"{server.process.returncode}:\n{tail(server.log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if server.health_s is None and client.get("/healthz").status_code == 200:
                    server.health_s = time.monotonic() - server.started
                if client.get("/readyz").status_code == 200:
                    server.ready_s = time.monotonic() - server.started
                    return
            time.sleep(POLL_S)
    raise RuntimeError(f"{server.label}: not ready after {timeout_s:.0f}s:\n"
                       f"{tail(server.log_path)}")


def stop_server(server: Server) -> None:
    """SIGTERM (uvicorn drains and stops its workers), then SIGKILL whatever is left."""
    server.rss.stop()
    stop_tree(server.process, STOP_TIMEOUT_S)


def matrix_seconds(server: Server, scrapes: int = 8) -> dict[str, float]:
    """recsys_item_matrix_load_seconds sum by source, from /metrics. Each scrape opens a new
    connection, so with several workers it may reach each of them: the largest sum wins."""
    found: dict[str, float] = {}
    pattern = re.compile(r'^recsys_item_matrix_load_seconds_sum\{source="(\w+)"\} (\S+)$', re.M)
    for _ in range(scrapes if server.workers > 1 else 1):
        with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=5.0) as client:
            text = client.get(f"{server.base_url}/metrics").text
            for source, value in pattern.findall(text):
                found[source] = max(found.get(source, 0.0), float(value))
    return found


def log_times(server: Server) -> dict[str, float]:
    """Seconds after the process started at which the INFO log says: the item matrix was
    being made (its reported duration back from the line), it was ready, serving began."""
    times: dict[str, float] = {}
    for line in tail(server.log_path, 1_000_000).splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        at = stamp - server.started_wall
        message = match[4]
        items = re.search(r"item representations (read from redis|computed) in ([\d.]+)s",
                          message)
        if items and "matrix_done" not in times:
            times["matrix_done"] = at
            times["matrix_start"] = at - float(items[2])
        elif message.startswith("serving model") and "serving" not in times:
            times["serving"] = at
        built = re.search(r"approximate index .* built in ([\d.]+)s", message)
        if built:
            times["ann_built"] = float(built[1])
    return times


def log_problems(server: Server) -> int:
    return sum(1 for line in tail(server.log_path, 2_000_000).splitlines()
               if re.search(r" (ERROR|CRITICAL) |Traceback", line))


# ---- load ---------------------------------------------------------------------------------------

def connections_per_worker(server: Server) -> list[int]:
    """Established client connections held by each worker process (the kernel hands each new
    connection to whichever worker accepts first, so a burst can land unevenly)."""
    counts = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(server.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if server.rss.role.get(proc.pid) == "worker":
                    counts.append(sum(1 for c in proc.net_connections(kind="tcp")
                                      if c.status == psutil.CONN_ESTABLISHED
                                      and c.laddr and c.laddr.port == server.port))
    return sorted(counts, reverse=True)


def load(server: Server, kind: str, concurrency: int, duration: float, items: int = ITEMS,
         seed: int = 0) -> dict[str, Any]:
    command = [sys.executable, str(LOADGEN), "--port", str(server.port), "--kind", kind,
               "--concurrency", str(concurrency), "--duration", str(duration),
               "--warmup", str(WARMUP_S), "--users", str(USERS), "--items", str(items),
               "--seed", str(seed), "--watch-pid", str(server.process.pid)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=clean_env())
        try:
            spread: list[int] = []
            if server.workers > 1 and concurrency > 1:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=WARMUP_S + 1.0)  # connections open by then
                spread = connections_per_worker(server)
            process.wait(timeout=WARMUP_S + duration + 120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"loadgen exited {process.returncode}: {stderr[-2000:]}")
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    report["connections_per_worker"] = spread
    return report


# ---- the naive way ------------------------------------------------------------------------------

def naive(version_dir: Path, pairs: bool, requests: int = NAIVE_REQUESTS) -> dict[str, Any]:
    """The way without a service, per request, in batches of 8192 items, then top-10.

    pairs=False: the item tower over every catalog item (inputs built from items.parquet), the
    user tower once, the head over the user and every item. pairs=True, literally the model on
    every (user, item) pair: the user's row repeated beside each item row, user tower, item
    tower and head over each pair (what Keras `predict` on the pair table computes).
    One unmeasured request first (TF's first-call cost)."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from service.serving.inputs import UserQuery, as_list, item_inputs, user_inputs
    from service.serving.loader import read_metadata

    _, spec = read_metadata(version_dir)
    model = tf.saved_model.load(str(version_dir))
    item_tower = model.signatures["item_tower"]
    user_tower = model.signatures["user_tower"]
    score = model.signatures["score"]
    query_time = model.signatures.get("query_time")

    def embed(queries: list[UserQuery]) -> Any:
        """u as the model defines it: the user tower's output plus the query time's vector."""
        user = user_tower(**user_inputs(spec.user_features, spec.history_length, queries))
        if query_time is None:
            return user["user_embedding"]
        now = tf.fill([len(queries)], tf.constant(time.time(), tf.float64))
        return user["user_embedding"] + query_time(query_time=now)["time_embedding"]

    items = pd.read_parquet(version_dir / ASSETS_DIR / ITEMS_FILE)
    items["item_id"] = items["item_id"].astype(str)
    users = pd.read_parquet(version_dir / ASSETS_DIR / USERS_FILE)
    rng = np.random.default_rng(0)
    batches = [items.iloc[s:s + NAIVE_ITEM_BATCH] for s in range(0, len(items), NAIVE_ITEM_BATCH)]
    latencies = []
    for n in range(requests + 1):
        row = users.iloc[int(rng.integers(0, len(users)))]
        features = {name: row[name] for name in spec.user_features.names
                    if not (row[name] is None or (isinstance(row[name], float)
                                                  and np.isnan(row[name])))}
        query = UserQuery(str(row["user_id"]), features, tuple(as_list(row["history"])))
        started = time.perf_counter()
        if pairs:
            parts = []
            for batch in batches:
                user = embed([query] * len(batch))
                columns = batch.to_dict("list")
                item = item_tower(**item_inputs(spec.item_features, columns))["item_embedding"]
                parts.append(score(user_embedding=user,
                                   item_embedding=item[:, None, :])["score"].numpy()[:, 0])
            scores = np.concatenate(parts)
        else:
            matrix = np.concatenate([item_tower(**item_inputs(spec.item_features,
                                                              batch.to_dict("list")))
                                     ["item_embedding"].numpy() for batch in batches])
            scores = score(user_embedding=embed([query]),
                           item_embedding=tf.constant(matrix[None]))["score"].numpy()[0]
        top = np.argpartition(-scores, 10)[:10]
        top = top[np.argsort(-scores[top])]
        elapsed = time.perf_counter() - started
        if n > 0:
            latencies.append(elapsed)
        print(f"  naive{' pairs' if pairs else ''} request {n}"
              f"{' (warm-up)' if n == 0 else ''}: {elapsed * 1000:.0f} ms", flush=True)
    ordered = sorted(latencies)
    return {"count": len(ordered), "errors": 0,
            "throughput_rps": round(len(ordered) / sum(ordered), 2),
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
            "p99_ms": round(ordered[-1] * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


# ---- the table ----------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    scenario: str
    server: str
    conc: str = "-"
    requests: str = "-"
    errors: str = "-"
    rps: str = "-"
    p50: str = "-"
    p99: str = "-"
    other: str = ""
    target: str = ""
    result: str = ""


def num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def le(value: float | None, limit: float) -> bool:
    """value <= limit; a missing figure (no request answered) never passes."""
    return value is not None and value <= limit


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def load_row(sid: str, scenario: str, server: str, report: dict[str, Any], target: str = "",
             ok: bool | None = None, other: str = "") -> Row:
    spread = report.get("connections_per_worker")
    if spread:
        conns = "conns/worker " + "/".join(str(n) for n in spread)
        other = f"{other}; {conns}" if other else conns
    cpu = report.get("cpu_cores") or {}
    if cpu.get("server") is not None:
        usage = (f"CPU cores: server {cpu['server']:.2f}, client {cpu['client']:.2f}, "
                 f"other {cpu['other']:.2f}")
        other = f"{other}; {usage}" if other else usage
    if report.get("check_failures"):
        other = (other + "; " if other else "") + f"bad bodies {report['check_failures']}"
    if report.get("errors_by_kind"):
        other = (other + "; " if other else "") + f"errors {report['errors_by_kind']}"
    return Row(sid, scenario, server, str(report["concurrency"]), str(report["count"]),
               str(report["errors"]), num(report["throughput_rps"], 0), num(report["p50_ms"], 2),
               num(report["p99_ms"], 2), other, target, verdict(ok) if target else "")


def print_table(rows: list[Row]) -> None:
    headers = Row("", "scenario", "server", "conc", "reqs", "errs", "req/s", "p50 ms", "p99 ms",
                  "other figures", "target", "result")
    names = list(Row.__dataclass_fields__)
    widths = {n: max(len(str(getattr(r, n))) for r in [headers, *rows]) for n in names}
    right = {"conc", "requests", "errors", "rps", "p50", "p99"}

    def line(row: Row) -> str:
        cells = []
        for n in names:
            value = str(getattr(row, n))
            cells.append(value.rjust(widths[n]) if n in right else value.ljust(widths[n]))
        return " | ".join(cells).rstrip()

    print()
    print(line(headers))
    print("-+-".join("-" * widths[n] for n in names))
    for row in rows:
        print(line(row))


# ---- main ---------------------------------------------------------------------------------------

def mb(value: float) -> str:
    return f"{value / MB:.0f}"


def rss_text(server: Server) -> str:
    ready, uss = server.extra.get("rss_at_ready_mb"), server.extra.get("uss_at_ready_mb")
    files = server.extra.get("file_at_ready_mb")
    return ("peak " + "/".join(mb(v) for v in server.rss.serving_peaks()) + " MB"
            + (" (when ready " + "/".join(str(v) for v in ready) + " MB, file-backed "
               + "/".join(str(v) for v in files or []) + ", USS "
               + "/".join(str(v) for v in uss or []) + " MB)" if ready else ""))


def run(args: argparse.Namespace, workdir: Path, rows: list[Row], raw: dict[str, Any],
        servers: list[Server], redis_box: list[EmbeddedRedis]) -> None:
    wanted = set(args.scenarios)
    if args.skip_1m:
        wanted -= {"h", "i"}
    v100 = ensure_100k(workdir, args.copy_100k_from)
    v1m = ensure_1m(v100) if wanted & {"h", "i"} else None
    print(f"models: {v100}" + (f", {v1m}" if v1m else ""), flush=True)

    redis = EmbeddedRedis().start()
    redis_box.append(redis)
    import redis as redis_client
    flusher = redis_client.Redis(host=HOST, port=redis.port, socket_timeout=5.0)
    flusher.flushall()
    flusher.close()
    duration = args.duration
    stored_100k = False  # whether Redis holds the 100k matrix yet

    def launch(label: str, name: str, workers: int, timeout_s: float = READY_TIMEOUT_S,
               log_level: str = "WARNING", **settings: str) -> Server:
        server = start_server(label, name, workers, redis.url, workdir, log_level, **settings)
        servers.append(server)
        wait_ready(server, timeout_s)
        rss, uss, files = server.rss.serving_now()
        server.extra["rss_at_ready_mb"] = [round(v / MB) for v in rss]
        server.extra["uss_at_ready_mb"] = [round(v / MB) for v in uss]
        server.extra["file_at_ready_mb"] = [round(v / MB) for v in files]
        print(f"  {label}: ready after {server.ready_s:.1f}s (app up after "
              f"{num(server.health_s)}s)", flush=True)
        return server

    def finish(server: Server) -> None:
        stop_server(server)
        server.extra["log_problems"] = log_problems(server)
        raw.setdefault("servers", {})[server.label] = {
            "ready_s": server.ready_s, "health_s": server.health_s,
            "serving_peak_rss_mb": [round(v / MB) for v in server.rss.serving_peaks()],
            "all_peak_rss_mb": {f"{server.rss.role.get(p, '?')}:{p}": round(v / MB)
                                for p, v in server.rss.peak.items()},
            **server.extra}

    a_p50: float | None = None
    b_rps: float | None = None

    # -- batching on: a, b, d, e ------------------------------------------------------------
    if wanted & set("abde"):
        print("server 100k, 2 workers, batching on (computes the item matrix)", flush=True)
        server = launch("100k-w2-batch", NAME_100K, 2)
        stored_100k = True
        cold = matrix_seconds(server)
        config = "100k w2 batch32"
        rows.append(Row("", "start, empty Redis", config, other=(
            f"ready {num(server.ready_s)} s; matrix computed+written "
            f"{num(cold.get('computed'), 2)} s")))
        try:
            if "a" in wanted:
                print("  a: recommend, 1 connection", flush=True)
                report = raw["a"] = load(server, "recommend", 1, duration)
                a_p50 = report["p50_ms"]
                rows.append(load_row("a", "recommend k=10", config, report,
                                     "p50<=3, p99<=10", report["errors"] == 0
                                     and le(report["p50_ms"], 3) and le(report["p99_ms"], 10)))
            if "b" in wanted:
                print("  b: recommend, 32 connections", flush=True)
                report = raw["b"] = load(server, "recommend", 32, duration, seed=1)
                b_rps = report["throughput_rps"]
                rows.append(load_row("b", "recommend k=10", config, report,
                                     ">=1500/s, p99<=60, 0 err", report["errors"] == 0
                                     and report["throughput_rps"] >= 1500
                                     and le(report["p99_ms"], 60)))
            if "d" in wanted:
                print("  d: recommend, 8 connections", flush=True)
                report = raw["d"] = load(server, "recommend", 8, duration, seed=2)
                rows.append(load_row("d", "recommend k=10", config, report))
            if "e" in wanted:
                print("  e: score 100 items, 1 connection", flush=True)
                report = raw["e"] = load(server, "score", 1, duration, seed=3)
                rows.append(load_row("e", "score 100 items", config, report, "p50<=2",
                                     report["errors"] == 0 and le(report["p50_ms"], 2)))
        finally:
            finish(server)
        rows.append(Row("", "peak RSS per worker", config, other=rss_text(server)))

    # -- batching off: c --------------------------------------------------------------------
    if "c" in wanted:
        print("server 100k, 2 workers, batching off", flush=True)
        server = launch("100k-w2-nobatch", NAME_100K, 2, RECSYS_BATCH_MAX_SIZE="1")
        stored_100k = True
        config = "100k w2 batch off"
        try:
            print("  c: recommend, 32 connections", flush=True)
            report = raw["c"] = load(server, "recommend", 32, duration, seed=1)
            gain = (f"b/c throughput {b_rps / report['throughput_rps']:.2f}x"
                    if b_rps and report["throughput_rps"] else "")
            rows.append(load_row("c", "recommend k=10", config, report, other=gain))
        finally:
            finish(server)
        rows.append(Row("", "peak RSS per worker", config, other=(
            f"{rss_text(server)}; ready {num(server.ready_s)} s (matrix from Redis)")))

    # -- the naive way: f (no server running) -------------------------------------------------
    if "f" in wanted:
        for pairs, label in ((False, "naive: towers+head/request"),
                             (True, "naive: model on all pairs")):
            print(f"f: {label}, in this process", flush=True)
            report = raw["f_pairs" if pairs else "f"] = naive(v100, pairs)
            ratio = a_p50 and report["p50_ms"] / a_p50
            rows.append(Row("f", label, "in-process TF", "1", str(report["count"]), "0",
                            num(report["throughput_rps"], 2), num(report["p50_ms"], 0),
                            num(report["p99_ms"], 0),
                            f"naive p50 / a p50 = {ratio:.0f}x" if ratio else "(a not run)",
                            # The baseline is the model on every pair; the towers and
                            # head once per request is a kinder one, shown for scale only.
                            ">=200x" if pairs else "(kinder; none)",
                            verdict(ratio >= 200 if ratio else None) if pairs else ""))

    # -- ready from Redis: g --------------------------------------------------------------------
    if "g" in wanted:
        if not stored_100k:
            print("g: a first 100k server fills Redis", flush=True)
            filler = launch("100k-fill", NAME_100K, 1)
            finish(filler)
        print("g: restart 100k (1 worker, INFO log) with its matrix in Redis", flush=True)
        server = launch("100k-restart", NAME_100K, 1, log_level="INFO")
        try:
            seconds = matrix_seconds(server)
            times = log_times(server)
        finally:
            finish(server)
        assert server.ready_s is not None
        from_redis = seconds.get("redis")
        after_load = (server.ready_s - times["matrix_start"]) if "matrix_start" in times \
            else None
        server.extra.update({"matrix_seconds": seconds, "log_times": times})
        raw["g"] = {"ready_s": server.ready_s, "health_s": server.health_s,
                    "matrix_seconds": seconds, "log_times": times,
                    "ready_after_model_loaded_s": after_load}
        # Seconds after the process started: app up (imports done), model loaded (SavedModel,
        # tables, warm-up), then the matrix from Redis and the request indexes.
        detail = [f"up {num(server.health_s)}"]
        if "matrix_start" in times:
            detail.append(f"loaded {times['matrix_start']:.1f}")
        detail.append(f"Redis read {num(from_redis, 2)}")
        if "serving" in times and "matrix_done" in times:
            detail.append(f"indexes {times['serving'] - times['matrix_done']:.2f}")
        check = after_load if after_load is not None else from_redis
        rows.append(Row("g", "ready, matrix in Redis", "100k w1", other=(
            f"{num(after_load, 2)} s after load; ready {server.ready_s:.1f} s after start ("
            + ", ".join(detail) + ")"),
                        target="<=3 s after model load",
                        result=verdict(check <= 3 if check is not None else None)))
        rows.append(Row("", "peak RSS", "100k w1", other=rss_text(server)))

    # -- 1M items: h --------------------------------------------------------------------------
    exact: list[list[tuple[str, float]]] | None = None
    if "h" in wanted:
        print("h: 1M items, 1 worker (computes and writes the item matrix)", flush=True)
        server = launch("1m-w1", NAME_1M, 1, timeout_s=READY_TIMEOUT_1M_S)
        config = "1M w1 batch32"
        try:
            seconds = matrix_seconds(server)
            computed = seconds.get("computed")
            rows.append(Row("h", "1M: compute+write matrix", config, other=(
                f"{num(computed, 1)} s; ready {num(server.ready_s)} s after start"),
                target="<=20 s", result=verdict(computed <= 20 if computed else None)))
            print("  h: recommend, 1 connection", flush=True)
            report = raw["h"] = load(server, "recommend", 1, duration, items=ITEMS_1M, seed=4)
            rows.append(load_row("h", "1M: recommend k=10", config, report, "p50<=15",
                                 report["errors"] == 0 and le(report["p50_ms"], 15)))
            # Batches of concurrent users: the memory a loaded 1M server needs (peak RSS below).
            print("  h: recommend, 32 connections", flush=True)
            report = raw["h_32"] = load(server, "recommend", 32, duration, items=ITEMS_1M,
                                        seed=5)
            rows.append(load_row("h", "1M: recommend k=10", config, report))
            exact = recommendations(server, RECALL_USERS)
        finally:
            finish(server)
        # The usual start (a restart, another replica) finds the matrix in Redis: its read
        # must not cost more memory than computing it.
        print("  h: a second start, the matrix in Redis", flush=True)
        again = launch("1m-w1-redis", NAME_1M, 1, timeout_s=READY_TIMEOUT_1M_S)
        try:
            recommendations(again, RECALL_USERS)
        finally:
            finish(again)
        raw["h_matrix_seconds"] = seconds
        for started, how in ((server, "computing"), (again, "from Redis")):
            rows.append(Row("h", f"1M: peak RSS, {how}", config, other=rss_text(started),
                            target="<=1.2 GB",
                            result=verdict(max(started.rss.serving_peaks()) <= 1.2 * GB)))

    # -- 1M items, approximate index: i -------------------------------------------------------
    if "i" in wanted:
        if exact is None:
            print("i: 1M items, exact answers first", flush=True)
            server = launch("1m-exact", NAME_1M, 1, timeout_s=READY_TIMEOUT_1M_S)
            try:
                exact = recommendations(server, RECALL_USERS)
            finally:
                finish(server)
        print("i: 1M items with RECSYS_RETRIEVAL_INDEX=ivf (matrix in Redis)", flush=True)
        server = launch("1m-ivf", NAME_1M, 1, timeout_s=READY_TIMEOUT_1M_S, log_level="INFO",
                        RECSYS_RETRIEVAL_INDEX="ivf")
        config = "1M w1 ivf"
        try:
            built = log_times(server).get("ann_built")
            rows.append(Row("i", "1M ANN: ready", config, other=(
                f"index built in {num(built, 1)} s; ready {num(server.ready_s)} s after start")))
            approximate = recommendations(server, RECALL_USERS)
            recall, by_id = recall_at_k(exact, approximate)
            raw["i_recall"] = {"tie_aware": recall, "by_id": by_id, "users": RECALL_USERS}
            rows.append(Row("i", "1M ANN: recall@10 vs exact", config, other=(
                f"{recall:.4f} over {RECALL_USERS} users (same ids: {by_id:.4f})"),
                target=">=0.95", result=verdict(recall >= 0.95)))
            report = raw["i"] = load(server, "recommend", 1, duration, items=ITEMS_1M, seed=4)
            rows.append(load_row("i", "1M ANN: recommend k=10", config, report, "p50<=5",
                                 report["errors"] == 0 and le(report["p50_ms"], 5)))
        finally:
            finish(server)
        rows.append(Row("i", "1M ANN: peak RSS", config, other=rss_text(server)))


def recommendations(server: Server, users: int) -> list[list[tuple[str, float]]]:
    """/v1/recommend k=10 for users u1..u<users>, in order."""
    answers = []
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        for n in range(1, users + 1):
            response = client.post("/v1/recommend", json={"user": {"id": f"u{n}"}, "k": 10})
            response.raise_for_status()
            answers.append([(i["item_id"], i["score"]) for i in response.json()["items"]])
    return answers


def recall_at_k(exact: list[list[tuple[str, float]]],
                approximate: list[list[tuple[str, float]]]) -> tuple[float, float]:
    """(tie-aware recall, recall by id). Tie-aware: an approximate item counts when its score
    reaches the exact k-th score, since among equal scores any is as right (the 1M catalog
    repeats the 100k catalog's feature rows, so many items score the same)."""
    aware, by_id = [], []
    for want, got in zip(exact, approximate, strict=True):
        kth = want[-1][1]
        aware.append(sum(score >= kth - 1e-6 for _, score in got) / len(want))
        by_id.append(len({i for i, _ in got} & {i for i, _ in want}) / len(want))
    return sum(aware) / len(aware), sum(by_id) / len(by_id)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="measured seconds per load scenario (default 10)")
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                        help="comma list out of a..i (default all)")
    parser.add_argument("--skip-1m", action="store_true", help="leave out scenarios h and i")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    parser.add_argument("--keep", action="store_true", help="keep the logs' temporary directory")
    parser.add_argument("--copy-100k-from", type=Path, default=None,
                        help="a finished version directory to copy as synth100k/1 instead of "
                             "training, when synth100k has no version yet")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: unknown {unknown}; choose from {','.join(ALL_SCENARIOS)}")
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be in [1, 600]")
    return args


# Run in a child with single-threaded BLAS, as the servers run: how fast this machine is today.
# The same code has measured 2x apart on different days here; this line tells them apart.
CALIBRATION = """
import time, numpy as np
rng = np.random.default_rng(0)
items = rng.random((100_000, 64), dtype=np.float32)
user = rng.random((1, 64), dtype=np.float32)
square = rng.random((256, 256), dtype=np.float32)
def p50(f, n):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]
print(p50(lambda: user @ items.T, 50) * 1e3, 2 * 256**3 / p50(lambda: square @ square, 50) / 1e9)
"""


def machine_speed() -> dict[str, float]:
    """p50 of one user's scores over 100k items (memory-bound, what retrieval does) and
    single-core GFLOP/s on a 256x256 product (compute-bound)."""
    out = subprocess.run([sys.executable, "-c", CALIBRATION], env=clean_env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return {"matvec_100k_ms": float(out[0]), "matmul_gflops": float(out[1])}


def cpu_model() -> str:
    """The CPU's name and whether it has AVX-512 (GUIDE §3's figures were measured with it)."""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        avx512 = "with" if re.search(r"\bavx512f\b", info) else "without"
        return f"{name.group(1).strip() if name else 'unknown CPU'}, {avx512} AVX-512"
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    rows: list[Row] = []
    raw: dict[str, Any] = {"argv": sys.argv[1:], "started": datetime.now().isoformat(),
                           "cpus": os.cpu_count()}
    servers: list[Server] = []
    redis_box: list[EmbeddedRedis] = []
    failed: str | None = None
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    raw["machine"] = speed = machine_speed()
    raw["cpu"] = cpu = cpu_model()
    try:
        try:
            run(args, workdir, rows, raw, servers, redis_box)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError,
                KeyError) as exc:
            failed = f"{type(exc).__name__}: {exc}"
        print_table(rows)
        for server in servers:
            problems = server.extra.get("log_problems")
            if problems:
                print(f"note: {server.label} log has {problems} ERROR/Traceback lines "
                      f"({server.log_path}; use --keep)")
        load_end = os.getloadavg()[0]
        raw["loadavg_1min"] = [load_start, load_end]
        print(f"\n{os.cpu_count()} CPUs (1-min load average {load_start:.1f} at start, "
              f"{load_end:.1f} at end); load from bench/loadgen.py in its own process, "
              f"{args.duration:g} s measured after {WARMUP_S:g} s warm-up; "
              f"total {time.monotonic() - started:.0f} s")
        print(f"machine: {cpu}; one user's scores over 100k x 64 items "
              f"{speed['matvec_100k_ms']:.2f} "
              f"ms (memory-bound), {speed['matmul_gflops']:.0f} GFLOP/s on one core "
              f"(compute-bound), numpy in a child process before the servers started")
        if args.json:
            raw["rows"] = [vars(r) for r in rows]
            raw["failed"] = failed
            args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n")
            print(f"raw figures written to {args.json}")
        if failed:
            print(f"FAILED: {failed}", file=sys.stderr)
            return 2
        return 1 if any(r.result == "FAIL" for r in rows) else 0
    finally:
        for server in servers:
            if server.process.poll() is None:
                stop_server(server)
            server.rss.stop()
        for embedded in redis_box:
            embedded.stop()
        if args.keep or failed:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
