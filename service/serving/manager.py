"""Owns the served model: finds the newest valid version, prepares it, swaps it in atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from service.model_format import RETRIEVAL_DOT, version_dirs
from service.serving import quantized_scan
from service.serving.ann import ApproximateIndex
from service.serving.errors import ModelLoadError
from service.serving.item_cache import ItemMatrixCache, VersionedHash, VersionKey
from service.serving.loader import ModelVersion, load_version
from service.serving.metrics import Metrics
from service.serving.quantized_scan import QuantizedScan
from service.serving.servable import ServingModel, compute_item_matrix
from service.settings import Settings

log = logging.getLogger(__name__)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (musl and macOS have none)."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


MALLOC_TRIM = _malloc_trim()


@dataclass
class RefreshResult:
    changed: bool
    refused: dict[int, str] = field(default_factory=dict)


def directory_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Changes when any file of a version changes: a refused version is retried only then."""
    return tuple(sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


class ModelManager:
    def __init__(self, settings: Settings, cache: ItemMatrixCache | None,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.cache = cache
        self.metrics = metrics
        self.current: ServingModel | None = None
        self.last_error: str | None = None
        self._refused: dict[int, tuple[tuple[tuple[str, int, int], ...], str]] = {}
        self._lock = threading.Lock()
        self._redis_reachable = True
        self._retired: list[weakref.ref[ServingModel]] = []  # switched out, maybe still held

    @property
    def model_dir(self) -> Path:
        return self.settings.model_store / self.settings.model_name

    def refresh(self) -> RefreshResult:
        """Serves the highest valid version newer than the current one, if any.

        Versions above the one served that fail to load are refused and reported; the current
        version keeps serving. One refresh runs at a time.
        """
        with self._lock:
            refused: dict[int, str] = {}
            served = self.current.number if self.current else 0
            candidates = [(n, p) for n, p in version_dirs(self.model_dir) if n > served]
            if not candidates and self.current is None:
                self.last_error = f"no model version under {self.model_dir}"
            for number, path in candidates:
                serving = self._load(number, path, refused)
                if serving is not None:
                    self._switch(serving)
                    self._precompute_users(serving)
                    break
            if refused and self.current is None:
                self.last_error = "; ".join(f"version {n}: {r}" for n, r in refused.items())
            return RefreshResult(self.current is not None and self.current.number != served,
                                 refused)

    def _load(self, number: int, path: Path, refused: dict[int, str]) -> ServingModel | None:
        """The version loaded, checked and warmed up, or None (refused, with the reason)."""
        signature = directory_signature(path)
        known = self._refused.get(number)
        if known and known[0] == signature:
            refused[number] = known[1]
            return None
        try:
            return self._prepare(load_version(self.settings.model_name, number, path))
        except Exception as exc:  # whatever breaks a version must not break the service
            log.error("refusing model %s version %d at %s: %s", self.settings.model_name,
                      number, path, exc, exc_info=not isinstance(exc, ModelLoadError))
            self.metrics.model_refusals.inc()
            self._refused[number] = (signature, str(exc))
            refused[number] = str(exc)
            return None

    def _prepare(self, version: ModelVersion) -> ServingModel:
        started = time.monotonic()
        release_memory()  # what reading the tables left behind, before the matrix comes
        digest = version.item_index.digest
        key = version_key(version)

        def compute() -> np.ndarray:
            return compute_item_matrix(version, self.settings.item_batch_size)

        if self.cache is None:
            matrix, source = compute(), "computed"
        else:
            matrix, source = self.cache.get_or_compute(key, digest, compute)
        if matrix.shape[0] != len(version.item_index):
            raise ModelLoadError(f"item matrix has {matrix.shape[0]} rows for "
                                 f"{len(version.item_index)} items")
        elapsed = time.monotonic() - started
        self.metrics.item_matrix_loads.labels(source).inc()
        self.metrics.item_matrix_seconds.labels(source).observe(elapsed)
        log.info("model %s version %d: %d item representations %s in %.2fs", version.name,
                 version.version, len(matrix), "read from redis" if source == "redis"
                 else "computed", elapsed)
        serving = ServingModel(version, matrix, source, self.settings.rerank_depth,
                               self._approximate_index(version, matrix),
                               self._quantized_scan(version, matrix))
        if self.cache is not None:
            self._publish_users(serving)
        return serving

    def _approximate_index(self, version: ModelVersion,
                           matrix: np.ndarray) -> ApproximateIndex | None:
        if self.settings.retrieval_index != "ivf" or version.spec.retrieval != RETRIEVAL_DOT:
            return None
        started = time.monotonic()
        index = ApproximateIndex(matrix, self.settings.ann_nprobe)
        log.info("model %s version %d: approximate index of %d lists (nprobe %d) built in "
                 "%.2fs", version.name, version.version, index.lists, index.index.nprobe,
                 time.monotonic() - started)
        return index

    def _quantized_scan(self, version: ModelVersion,
                        matrix: np.ndarray) -> QuantizedScan | None:
        # With an approximate index, exact retrieval is only the rare fallback.
        if (not self.settings.quantized_scan or self.settings.retrieval_index != "exact"
                or version.spec.retrieval != RETRIEVAL_DOT
                or len(matrix) < quantized_scan.MIN_ITEMS):
            return None
        started = time.monotonic()
        scan = QuantizedScan(matrix)
        log.info("model %s version %d: 8-bit scan copy (%d MB) built in %.2fs", version.name,
                 version.version, scan.nbytes >> 20, time.monotonic() - started)
        return scan

    def settle_cache(self) -> None:
        """Checks Redis (each maintenance tick): logs and exports whether it answers, and puts
        back the served version's entries when they are missing — Redis was down when the
        version was prepared, or came back empty after a restart, flush or failover."""
        if self.cache is None:
            return
        reachable = self.cache.ping()
        self.metrics.redis_up.set(1 if reachable else 0)
        if reachable != self._redis_reachable:
            log.log(logging.INFO if reachable else logging.WARNING, "redis %s",
                    "answers again" if reachable else f"unreachable: {self.cache.last_error}")
            self._redis_reachable = reachable
        current = self.current
        if reachable and current is not None:
            self._store_matrix(current)
            self._publish_users(current)

    def _store_matrix(self, serving: ServingModel) -> None:
        assert self.cache is not None
        key = version_key(serving.version)
        missing = not self.cache.contains(key) and not self.cache.degraded
        if missing and self.cache.store(key, serving.item_matrix,
                                        serving.item_index.digest):
            log.info("item matrix of version %d written to redis", serving.number)

    def _publish_users(self, serving: ServingModel) -> None:
        """The user table in Redis, once per version, for other processes and tools."""
        assert self.cache is not None
        key = version_key(serving.version)
        users = VersionedHash(self.cache.client, self.cache, "users")
        if users.is_complete(key) or self.cache.degraded:
            return
        users.put_many(key, ((uid, json.dumps({k: _plain(v) for k, v in serving.user_record(
            uid, user).items()}, allow_nan=False).encode()) for uid, user in serving.users.items()))

    def _precompute_users(self, serving: ServingModel) -> None:
        """Stored users' embeddings in the background, after readiness (never delaying it);
        the pass stops if another version is switched in meanwhile."""
        if not self.settings.precompute_users or not len(serving.users):
            return

        def run() -> None:
            try:
                serving.precompute_users(keep_going=lambda: self.current is serving)
            except Exception:  # requests still compute any user on their own
                log.exception("computing the stored users' embeddings failed")

        threading.Thread(target=run, name="user-embeddings", daemon=True).start()

    def _switch(self, serving: ServingModel) -> None:
        # Metrics first: whoever sees the new version ready also sees it counted.
        previous = self.current
        self.metrics.model_loads.inc()
        if previous is not None:
            self.metrics.model_info.remove(previous.name, str(previous.number),
                                           previous.version.fingerprint[:16])
        self.metrics.model_info.labels(serving.name, str(serving.number),
                                       serving.version.fingerprint[:16]).set(1)
        self.metrics.items.set(serving.item_count)
        self.current, self.last_error = serving, None
        log.info("serving model %s version %d", serving.name, serving.number)
        # Requests still holding the old version finish on it; then its TF objects and
        # matrix are garbage. Collecting now, and handing the heap that loading used back to
        # the OS, keeps memory flat across reloads. Last, so that readiness never waits.
        if previous is not None:
            self._retired.append(weakref.ref(previous))
        del previous
        self._release_retired()

    @property
    def retiring(self) -> bool:
        """A switched-out version was still held by requests when last checked."""
        return bool(self._retired)

    def release_retired(self) -> None:
        """Maintenance's retry once requests let go of a switched-out version."""
        with self._lock:
            self._release_retired()

    def _release_retired(self) -> None:
        """Frees what switched-out versions left, then, once none is held any more, freezes
        the heap (gc.freeze): the loaded model's ~360k long-lived objects then sit outside
        the cyclic collector, whose full passes under load had walked them all, 150 ms with
        the GIL held, every few seconds. Not while one is held: its reference cycles would
        be frozen with it."""
        release_memory()
        self._retired = [ref for ref in self._retired if ref() is not None]
        if not self._retired:
            gc.freeze()


def release_memory() -> None:
    gc.unfreeze()  # frozen objects are never collected, even once garbage
    gc.collect()
    pa.default_memory_pool().release_unused()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)  # glibc keeps freed heap pages otherwise (about 25 MB at 1M items)


def version_key(version: ModelVersion) -> VersionKey:
    return VersionKey(version.name, version.version, version.fingerprint)


def _plain(value: object) -> object:
    """A user-table cell as strict JSON: arrays as lists, missing numbers as null."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool | list):
        return value
    return str(value)
