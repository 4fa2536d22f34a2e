"""Model quality benchmark (`make bench-quality`): the project's models against classic peers,
and the default model measured through the running service.

    .venv/bin/python bench/quality.py --data ../shared/data/ml-100k [--seeds 0,1,2]
        [--out bench/results/quality] [--epochs N] [--concurrency 8] [--threads 1]
        [--keep-store]

Protocol (service/training/split.py, evaluate.py, metrics.py; the trainer's own code is reused
here, so the split, the sampled negatives and the exclusions are exactly the trainer's):
every rating is a positive; per user the last interaction by time is the test item (ties: the
larger item id), the one before it the validation item. Sampled: the test item among 99 items
drawn uniformly (seed = the run's seed) from those the user never interacted with; full: the
top 10 over the whole catalog without the user's training (train + validation) items.
HR@10 and NDCG@10.

For each seed, one run:
1. the split and the trainer's evaluation sets (`evaluate.make_eval_set`, as pipeline.run);
2. peers (bench/peers.py): popularity; implicit ALS and BPR tuned by a small grid on the
   validation split (fit on train), refit on train + validation, scored on the test;
3. `recsys-train` (subprocess, temporary model store) for the default model and `--arch seed`;
   their metadata.json evaluation is the "trainer-reported" row;
4. `recsys-serve` (a real process; private Redis since RECSYS_REDIS_URL is unset) on the
   default model, measured through HTTP: POST /v1/score with the test item and its 99
   negatives (sampled), POST /v1/recommend k=10 exclude_seen=true (full). Checks: the exported
   users.parquet history equals the protocol's training items per user, no answer contains a
   seen item, and trainer-reported and HTTP numbers agree within --tolerance.

Prints one markdown table; writes results.json, table.md and the logs under --out.
Exit status: 0 when every check holds, 1 when one fails, 2 when the setup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for path in (ROOT, BENCH):  # `python bench/quality.py` puts bench/, not the root, on the path
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import peers  # noqa: E402  (bench/ is on sys.path)
from processes import clean_env, executable, stop_tree, tail  # noqa: E402

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID, Dataset  # noqa: E402
from service.data.load import load_dataset  # noqa: E402
from service.model_format import (  # noqa: E402
    ASSETS_DIR,
    METADATA_FILE,
    USERS_FILE,
    version_dirs,
)
from service.redis_server import free_port  # noqa: E402
from service.training import evaluate, metrics  # noqa: E402
from service.training.evaluate import EvalSet  # noqa: E402
from service.training.features import (  # noqa: E402
    POPULARITY,
    fit_feature_schema,
    with_popularity,
)
from service.training.pipeline import (  # noqa: E402
    LABELLED_HOLDOUT_FRACTION,
    VALIDATION_USERS,
)
from service.training.split import Split, leave_last_out  # noqa: E402

HOST = "127.0.0.1"
K = evaluate.K
HISTORY_LENGTH = 50  # the trainer's default; only its item vocabulary matters here
TRAIN_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 60.0
COLUMNS = peers.RANKING
HEADERS = ("sampled HR@10", "sampled NDCG@10", "full HR@10", "full NDCG@10")
ROW_POPULARITY, ROW_ALS, ROW_BPR = "popularity", "ALS (implicit)", "BPR (implicit)"
ROW_SEED = "seed (`--arch seed`, trainer-reported)"
ROW_DEFAULT = "default (trainer-reported)"
ROW_HTTP = "default (through HTTP)"
PEER_ROWS = (ROW_POPULARITY, ROW_ALS, ROW_BPR, ROW_SEED)


def log(message: str) -> None:
    print(message, flush=True)


# ---- protocol ------------------------------------------------------------------------------------

@dataclass
class Protocol:
    """The split and the trainer's evaluation sets for one seed (as pipeline.run builds them)."""

    split: Split
    known: pd.DataFrame  # train + validation: what the test is allowed to see
    catalog: pd.Index
    users: pd.Index
    validation: EvalSet
    test: EvalSet


def split_of(dataset: Dataset) -> Split:
    return leave_last_out(dataset.interactions,
                          LABELLED_HOLDOUT_FRACTION if dataset.has_labels else 0.0)


def build_protocol(dataset: Dataset, split: Split, seed: int) -> Protocol:
    items = with_popularity(dataset.items, split.train)
    item_spec = replace(dataset.item_features,
                        numeric=(*dataset.item_features.numeric, POPULARITY))
    schema = fit_feature_schema(split.train, dataset.users, items, dataset.user_features,
                                item_spec, HISTORY_LENGTH)
    catalog = pd.Index(items[ITEM_ID])
    known = pd.concat([split.train, split.validation], ignore_index=True)
    validation = evaluate.make_eval_set(
        split.validation_items, split.train, dataset.interactions, None, catalog, schema,
        seed, max_users=VALIDATION_USERS)
    test = evaluate.make_eval_set(split.test_items, known, dataset.interactions, None,
                                  catalog, schema, seed)
    users = pd.Index(np.sort(dataset.interactions[USER_ID].unique()))
    return Protocol(split, known, catalog, users, validation, test)


def positive_items_by_user(rows: pd.DataFrame) -> dict[str, set[str]]:
    if LABEL in rows.columns:
        rows = rows.loc[rows[LABEL].to_numpy() == 1]
    return {str(u): set(map(str, g)) for u, g in rows.groupby(USER_ID, sort=False)[ITEM_ID]}


# ---- the project's trainer -----------------------------------------------------------------------

@dataclass
class Trained:
    name: str
    arch: str
    version_dir: Path
    test: dict[str, float]
    metadata: dict[str, Any]
    seconds: float


def train(data: Path, store: Path, name: str, arch: str | None, seed: int, epochs: int | None,
          log_path: Path) -> Trained:
    command = [*executable("recsys-train", "service.training.cli"), "--data", str(data),
               "--model-store", str(store), "--name", name, "--seed", str(seed)]
    if arch is not None:
        command += ["--arch", arch]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    log(f"  $ {' '.join(command)}")
    began = time.monotonic()
    with log_path.open("wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                cwd=ROOT, timeout=TRAIN_TIMEOUT_S, check=False)
    seconds = time.monotonic() - began
    versions = version_dirs(store / name)
    if result.returncode != 0 or not versions:
        raise RuntimeError(f"recsys-train exited {result.returncode}; see {log_path}:\n"
                           f"{tail(log_path)}")
    version_dir = versions[0][1]
    metadata = json.loads((version_dir / METADATA_FILE).read_text(encoding="utf-8"))
    reported = metadata["evaluation"]["metrics"]
    own = [key for key in reported if key.endswith("(this model)")]
    if len(own) != 1:
        raise RuntimeError(f"{version_dir}: no single '(this model)' entry in {list(reported)}")
    values = {c: float("nan") if reported[own[0]].get(c) is None else float(reported[own[0]][c])
              for c in COLUMNS}
    arch_name = str(metadata["training"]["model"]["arch"])
    log(f"  {name} ({arch_name}): {version_dir} in {seconds:.0f}s, best epoch "
        f"{metadata['training'].get('best_epoch')}; {fmt_metrics(values)}")
    return Trained(name, arch_name, version_dir, values, metadata, seconds)


def split_matches_trainer(split: Split, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's split sizes (metadata.json) against the bench's split of the same data."""
    data, evaluation = metadata["data"], metadata["evaluation"]
    ours = {"train_rows": len(split.train), "validation_rows": len(split.validation),
            "test_rows": len(split.test), "test_users": len(split.test_items)}
    theirs = {"train_rows": data.get("train_rows"), "validation_rows": data.get("validation_rows"),
              "test_rows": data.get("test_rows"), "test_users": evaluation.get("test_users")}
    return {"bench": ours, "trainer": theirs, "equal": ours == theirs}


# ---- the service ---------------------------------------------------------------------------------

@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float
    ready_s: float = math.nan

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_server(store: Path, name: str, log_path: Path) -> Served:
    port = free_port()
    env = clean_env(RECSYS_MODEL_STORE=str(store), RECSYS_MODEL_NAME=name,
                    RECSYS_POLL_INTERVAL_S="0", RECSYS_LOG_LEVEL="WARNING")
    command = [*executable("recsys-serve", "service.serving.cli"), "--host", HOST,
               "--port", str(port)]
    log(f"  $ RECSYS_MODEL_STORE={store} RECSYS_MODEL_NAME={name} {' '.join(command)}")
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT)
    return Served(process, port, log_path, time.monotonic())


def wait_ready(server: Served) -> None:
    deadline = server.started + READY_TIMEOUT_S
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"recsys-serve exited {server.process.returncode}:\n"
                                   f"{tail(server.log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    server.ready_s = time.monotonic() - server.started
                    return
            time.sleep(0.1)
    raise RuntimeError(f"recsys-serve not ready after {READY_TIMEOUT_S:.0f}s:\n"
                       f"{tail(server.log_path)}")


def stop_server(server: Served) -> None:
    """SIGTERM (drains, stops its private Redis), then SIGKILL whatever of its tree is left."""
    stop_tree(server.process, STOP_TIMEOUT_S)


@dataclass
class HttpAnswers:
    version: int
    scores: list[list[float]]          # per test user: [target, *negatives] as asked
    unknown: list[list[str]]
    top: list[list[str]]               # per test user: recommended item ids, best first
    seconds: float
    requests: int


async def ask_all(base_url: str, score_bodies: Sequence[dict[str, Any]],
                  recommend_bodies: Sequence[dict[str, Any]],
                  concurrency: int) -> tuple[list[Any], list[Any]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_S,
                                 limits=limits) as client:
        async def post(path: str, body: dict[str, Any]) -> Any:
            async with gate:
                response = await client.post(path, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"POST {path} -> {response.status_code}: {response.text}")
            return response.json()
        scored = await asyncio.gather(*(post("/v1/score", b) for b in score_bodies))
        recommended = await asyncio.gather(*(post("/v1/recommend", b)
                                             for b in recommend_bodies))
    return list(scored), list(recommended)


def measure_http(server: Served, data: EvalSet, concurrency: int) -> HttpAnswers:
    catalog = data.catalog.to_numpy(dtype=object)
    users = data.targets[USER_ID].astype(str).tolist()
    targets = data.targets[ITEM_ID].astype(str).tolist()
    # Each request is made when the user's test interaction happened, as the trainer scores it.
    contexts = [{"time": int(t)} for t in data.targets[TIMESTAMP]]
    score_bodies = [{"user": {"id": user}, "context": context,
                     "item_ids": [target, *(str(catalog[n]) for n in negatives if n >= 0)]}
                    for user, target, negatives, context in zip(users, targets, data.negatives,
                                                                contexts, strict=True)]
    recommend_bodies = [{"user": {"id": user}, "k": K, "exclude_seen": True, "context": context}
                        for user, context in zip(users, contexts, strict=True)]
    began = time.monotonic()
    scored, recommended = asyncio.run(ask_all(server.base_url, score_bodies, recommend_bodies,
                                              concurrency))
    seconds = time.monotonic() - began
    versions = {a["model"]["version"] for a in scored} | {a["model"]["version"]
                                                          for a in recommended}
    if len(versions) != 1:
        raise RuntimeError(f"answers came from several model versions: {sorted(versions)}")
    for user, body, answer in zip(users, score_bodies, scored, strict=True):
        answered = [s["item_id"] for s in answer["scores"]]
        unknown = set(answer["unknown_item_ids"])
        if answered != [i for i in body["item_ids"] if i not in unknown]:
            raise RuntimeError(f"/v1/score did not answer the items asked for user {user} "
                               f"in their order")
    return HttpAnswers(
        version=versions.pop(),
        scores=[[float(s["score"]) for s in a["scores"]] for a in scored],
        unknown=[list(a["unknown_item_ids"]) for a in scored],
        top=[[str(i["item_id"]) for i in a["items"]] for a in recommended],
        seconds=seconds, requests=len(scored) + len(recommended))


def http_metrics(answers: HttpAnswers, data: EvalSet) -> tuple[dict[str, float], dict[str, Any]]:
    """The four metrics from the service's answers, by the trainer's metric functions."""
    n_users = len(data.targets)
    n_neg = data.negatives.shape[1]
    pos = np.zeros(n_users)
    neg = np.full((n_users, n_neg), -np.inf)
    valid = np.zeros((n_users, n_neg), dtype=bool)
    ties = 0
    for row, scores in enumerate(answers.scores):
        if answers.unknown[row] or len(scores) != 1 + int((data.negatives[row] >= 0).sum()):
            raise RuntimeError(f"/v1/score did not score every candidate of user row {row}: "
                               f"unknown {answers.unknown[row]}")
        pos[row] = scores[0]
        neg[row, :len(scores) - 1] = scores[1:]
        valid[row, :len(scores) - 1] = True
        ties += int(np.any(np.asarray(scores[1:]) == scores[0]))
    ranks = metrics.sampled_ranks(pos, neg, valid)
    hr, ndcg = metrics.full_ranking_hits(answers.top, data.targets[ITEM_ID].astype(str)
                                         .to_numpy(dtype=object), K)
    values = {"sampled_hr@10": metrics.hit_rate_at_k(ranks, K),
              "sampled_ndcg@10": metrics.ndcg_at_k(ranks, K),
              "full_hr@10": hr, "full_ndcg@10": ndcg}
    short = sum(1 for t in answers.top if len(t) < K)
    return values, {"users_with_a_tied_negative": ties, "recommend_lists_short_of_k": short}


def exclusion_checks(version_dir: Path, protocol: Protocol,
                     answers: HttpAnswers) -> dict[str, Any]:
    """users.parquet history == the protocol's training positives (train + validation); no
    recommended item is one of them; the test item is never excluded as seen."""
    table = pd.read_parquet(version_dir / ASSETS_DIR / USERS_FILE)
    history = {str(u): [str(i) for i in h]
               for u, h in zip(table[USER_ID], table["history"], strict=True)}
    known = positive_items_by_user(protocol.known)
    users = set(history) | set(known)
    set_mismatch = sorted(u for u in users if set(history.get(u, [])) != known.get(u, set()))
    duplicated = sorted(u for u, h in history.items() if len(h) != len(set(h)))
    order_mismatch = history_order_mismatches(protocol.known, history)
    targets = protocol.test.targets
    test_item_seen = int(sum(str(i) in known.get(str(u), set())
                             for u, i in zip(targets[USER_ID], targets[ITEM_ID], strict=True)))
    seen_recommended = sum(
        len(set(top) & known.get(str(user), set()))
        for user, top in zip(targets[USER_ID], answers.top, strict=True))
    return {
        "users_compared": len(users),
        "history_set_mismatches": len(set_mismatch),
        "history_set_mismatch_examples": set_mismatch[:5],
        "history_with_repeats": len(duplicated),
        # Informational: pipeline.histories breaks timestamp ties by item id as a string,
        # split.py numerically; the sets (what exclude_seen uses) are unaffected.
        "info_history_tie_order_differs_from_split_order": len(order_mismatch),
        "info_history_order_examples": order_mismatch[:3],
        "test_items_among_training_items": test_item_seen,
        "seen_items_recommended": seen_recommended,
        "ok": not set_mismatch and seen_recommended == 0,
    }


def history_order_mismatches(known: pd.DataFrame, history: Mapping[str, list[str]]
                             ) -> list[str]:
    """Users whose stored history is not in the protocol's time order (split.py: timestamp,
    then item id numerically when every id is an integer); informational only."""
    rows = known.loc[known[LABEL].to_numpy() == 1] if LABEL in known.columns else known
    numeric = pd.to_numeric(rows[ITEM_ID], errors="coerce")
    key = numeric if numeric.notna().all() else rows[ITEM_ID].astype(str)
    ordered = rows.assign(_key=key).sort_values([USER_ID, TIMESTAMP, "_key"], kind="stable")
    expected = {str(u): [str(i) for i in g]
                for u, g in ordered.groupby(USER_ID, sort=False)[ITEM_ID]}
    return sorted(u for u, h in expected.items() if history.get(u) != h)


# ---- one seed ------------------------------------------------------------------------------------

@dataclass
class SeedRun:
    seed: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


def run_seed(args: argparse.Namespace, dataset: Dataset, split: Split, seed: int, store: Path,
             logs: Path) -> SeedRun:
    result = SeedRun(seed)
    log(f"seed {seed}: evaluation sets")
    protocol = build_protocol(dataset, split, seed)
    log(f"  {len(protocol.validation.targets)} validation / {len(protocol.test.targets)} test "
        f"users, {len(protocol.catalog)} items")

    log(f"seed {seed}: peers")
    pop = peers.popularity(protocol.known, protocol.test)
    add_peer(result, ROW_POPULARITY, pop, "item counts of train + validation")
    train_matrix = peers.user_item_matrix(protocol.split.train, protocol.users, protocol.catalog)
    known_matrix = peers.user_item_matrix(protocol.known, protocol.users, protocol.catalog)
    for row, peer in ((ROW_ALS, peers.als_peer(seed, args.threads)),
                      (ROW_BPR, peers.bpr_peer(seed, args.threads))):
        fitted = peers.tune_and_test(peer, protocol.users, train_matrix, known_matrix,
                                     protocol.validation, protocol.test, log)
        add_peer(result, row, fitted, peers.format_settings(fitted.settings))
        own, theirs = fitted.test["full_hr@10"], fitted.checks["implicit_recommend_full_hr@10"]
        result.checks[f"{peer.name}: implicit.recommend full HR@10 == project's top-k"] = {
            "project": own, "implicit": theirs, "ok": abs(own - theirs) <= args.tolerance}

    log(f"seed {seed}: recsys-train")
    seed_model = train(args.data, store, f"seed-s{seed}", "seed", seed, args.epochs,
                       logs / f"train-seed-s{seed}.log")
    default = train(args.data, store, f"default-s{seed}", None, seed, args.epochs,
                    logs / f"train-default-s{seed}.log")
    for trained, row in ((seed_model, ROW_SEED), (default, ROW_DEFAULT)):
        result.rows[row] = trained.test
        result.seconds[row] = trained.seconds
        result.settings[row] = (f"{trained.arch}, recsys-train defaults, best epoch "
                                f"{trained.metadata['training'].get('best_epoch')}")
        match = split_matches_trainer(split, trained.metadata)
        result.checks[f"{trained.name}: trainer's split == bench's split"] = match
        result.details[row] = {"version_dir": str(trained.version_dir),
                               "trainer_table": trained.metadata["evaluation"]["metrics"]}

    log(f"seed {seed}: recsys-serve on {default.version_dir}")
    server = start_server(store, default.name, logs / f"serve-default-s{seed}.log")
    try:
        wait_ready(server)
        log(f"  ready in {server.ready_s:.1f}s; asking {len(protocol.test.targets)} users "
            f"(/v1/score + /v1/recommend, concurrency {args.concurrency})")
        answers = measure_http(server, protocol.test, args.concurrency)
    finally:
        stop_server(server)
    if answers.version != int(default.version_dir.name):
        raise RuntimeError(f"served version {answers.version}, trained {default.version_dir}")
    values, diagnostics = http_metrics(answers, protocol.test)
    result.rows[ROW_HTTP] = values
    result.seconds[ROW_HTTP] = server.ready_s + answers.seconds
    result.settings[ROW_HTTP] = (f"recsys-serve v{answers.version}: {answers.requests} requests "
                                 f"in {answers.seconds:.1f}s after ready in {server.ready_s:.1f}s")
    log(f"  HTTP: {fmt_metrics(values)} ({answers.requests} requests, {answers.seconds:.1f}s)")
    exclusion = exclusion_checks(default.version_dir, protocol, answers)
    result.checks["exclude_seen == protocol's training items"] = exclusion
    differences = {c: values[c] - default.test[c] for c in COLUMNS}
    result.checks["trainer-reported == through HTTP"] = {
        "differences": differences, "tolerance": args.tolerance, **diagnostics,
        "ok": all(abs(d) <= args.tolerance for d in differences.values())}
    result.ok = all(check.get("ok", check.get("equal", True)) for check in result.checks.values())
    return result


def add_peer(result: SeedRun, row: str, fitted: peers.PeerResult, settings: str) -> None:
    result.rows[row] = fitted.test
    result.seconds[row] = fitted.seconds
    result.settings[row] = settings
    result.details[row] = {"settings": fitted.settings, "validation": fitted.validation,
                           "grid": fitted.grid, "checks": fitted.checks}
    log(f"  {row}: {fmt_metrics(fitted.test)} ({fitted.seconds:.1f}s)")


# ---- report --------------------------------------------------------------------------------------

def fmt_metrics(values: Mapping[str, float]) -> str:
    return ", ".join(f"{c} {values[c]:.4f}" for c in COLUMNS)


def mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


ROW_ORDER = (ROW_POPULARITY, ROW_ALS, ROW_BPR, ROW_SEED, ROW_DEFAULT, ROW_HTTP)


def table(runs: Sequence[SeedRun]) -> str:
    lines = ["| model | " + " | ".join(HEADERS) + " | settings | wall time |",
             "| --- | " + " | ".join("---" for _ in HEADERS) + " | --- | --- |"]
    for row in ROW_ORDER:
        cells = [mean_sd([r.rows[row][c] for r in runs]) for c in COLUMNS]
        settings = "; ".join(dict.fromkeys(r.settings[row] for r in runs))
        seconds = statistics.fmean(r.seconds[row] for r in runs)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {settings} | {seconds:.0f} s |")
    ratios = []
    for column in COLUMNS:
        means = {row: statistics.fmean(r.rows[row][column] for r in runs) for row in PEER_ROWS}
        best = max(means, key=lambda row: means[row])
        ours = statistics.fmean(r.rows[ROW_HTTP][column] for r in runs)
        ratios.append(f"{ours / means[best]:.2f}x ({best.split(' ')[0]})"
                      if means[best] > 0 else "-")
    lines.append("| default (HTTP) / best peer | " + " | ".join(ratios) + " | | |")
    return "\n".join(lines)


def report_checks(runs: Sequence[SeedRun]) -> list[str]:
    lines = []
    for run in runs:
        for name, check in run.checks.items():
            ok = check.get("ok", check.get("equal"))
            detail = {k: v for k, v in check.items() if k not in ("ok", "equal")}
            lines.append(f"[{'ok' if ok else 'FAIL'}] seed {run.seed}: {name}: "
                         f"{json.dumps(detail, default=str)}")
    return lines



def to_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        return to_json(value.item())
    return value


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k",
                        help="a dataset directory recsys-train reads (default: ML-100K)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality",
                        help="where results.json, table.md and the logs go")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds (negatives, trainers, peers); default 0")
    parser.add_argument("--epochs", type=int, default=None,
                        help="recsys-train --epochs (default: the trainer's)")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight")
    parser.add_argument("--threads", type=int, default=1, help="implicit's num_threads")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest accepted |trainer - HTTP| per metric")
    parser.add_argument("--keep-store", action="store_true",
                        help="keep the trained models under OUT/store (default: a temp store)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not args.seeds:
        parser.error("--seeds: at least one seed")
    args.data = args.data.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        dataset = load_dataset(str(args.data))
    except Exception as exc:
        log(f"error: cannot load {args.data}: {exc}")
        return 2
    split = split_of(dataset)
    log(f"{dataset.name}: {dataset.interactions[USER_ID].nunique()} users, {len(dataset.items)} "
        f"items, {len(dataset.interactions)} interactions; split {len(split.train)} train / "
        f"{len(split.validation)} validation / {len(split.test)} test rows")
    runs: list[SeedRun] = []
    with store_dir(args) as store:
        for seed in args.seeds:
            try:
                runs.append(run_seed(args, dataset, split, seed, store, logs))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"error (seed {seed}): {exc}")
                return 2
    seconds = time.monotonic() - began
    text = table(runs)
    checks = report_checks(runs)
    summary = (f"{dataset.name}, seeds {','.join(map(str, args.seeds))}; "
               f"total wall time {seconds:.0f} s")
    print("\n" + text + "\n\n" + summary + "\n" + "\n".join(checks), flush=True)
    (args.out / "table.md").write_text(text + "\n\n" + summary + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(to_json({
        "data": str(args.data), "seeds": args.seeds, "seconds": seconds,
        "grids": {"ALS": peers.ALS_GRID, "BPR": peers.BPR_GRID,
                  "selected_by": f"validation {peers.SELECT_BY}"},
        "runs": [{"seed": r.seed, "rows": r.rows, "seconds": r.seconds, "settings": r.settings,
                  "checks": r.checks, "details": r.details, "ok": r.ok} for r in runs],
    }), indent=2), encoding="utf-8")
    log(f"wrote {args.out / 'table.md'} and {args.out / 'results.json'}")
    return 0 if all(r.ok for r in runs) else 1


@contextlib.contextmanager
def store_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.keep_store:
        store = args.out / "store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        yield store
        return
    with tempfile.TemporaryDirectory(prefix="recsys-quality-store-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    sys.exit(main())
