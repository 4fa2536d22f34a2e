"""Shared, versioned Redis cache for the item matrix (and other per-version data).

Layout of one model version's item matrix (every key shares the `{name:version:fingerprint}` hash
tag, so a Redis Cluster keeps a version in one slot and MULTI/EXEC works there too):

    <prefix>{<name>:<version>:<fingerprint>}:items:manifest   JSON, written last in the same MULTI
    <prefix>{<name>:<version>:<fingerprint>}:items:chunks     HASH "0".."n-1" -> raw '<f4' bytes
    <prefix>{<name>:<version>:<fingerprint>}:items:lock       redis-py lock with an expiry

The chunks live in one hash so that a store replaces them and a corrupt entry is removed with a
single atomic DEL, with no stale chunks left behind. Values are raw bytes; nothing is pickled.

Redis is an accelerator here, never a dependency: every public method catches `redis.RedisError`,
logs it, counts it and falls back (a miss, a local computation, `False`). After an error the cache
skips Redis for `error_backoff_s` so that an outage costs one timeout, not one per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.lock import Lock
from redis.retry import Retry

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPE = "<f4"
CHECKSUM_PREFIX = "sha256:"
MAX_CHUNKS = 1 << 16
HSET_BATCH_FIELDS = 10_000
# Chunks read per round trip (32 MB at the default 4 MB chunks): the transient memory of a read
# beside the matrix. The whole matrix in one MULTI held it twice over: a 1M-item server that
# found its matrix in Redis peaked at 1,355 to 1,451 MB against 1,180 when computing it.
READ_GROUP_CHUNKS = 8
POLL_INTERVAL_S = 0.05

Source = Literal["redis", "computed"]
T = TypeVar("T")

_SAFE_CHARS = frozenset((string.ascii_letters + string.digits + "_.-").encode())
_PART_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_GLOB_SPECIAL_RE = re.compile(r"([*?\[\]\\])")


def escape_component(text: str) -> str:
    """Percent-encodes every UTF-8 byte outside [A-Za-z0-9_.-]: injective, and never yields
    ':', '{', '}' or a glob character, so no model name can spell another version's key."""
    return "".join(chr(b) if b in _SAFE_CHARS else f"%{b:02X}" for b in text.encode("utf-8"))


# A standalone server or a cluster: every command this module sends works on both, because
# a version's keys share one slot (MULTI/EXEC, WATCH and multi-key DEL need that in a cluster).
RedisClient = redis.Redis | RedisCluster


def connect(url: str, *, cluster: bool = False, timeout_s: float = 0.5,
            retries: int = 1) -> RedisClient:
    """A client that fails fast: redis-py 8's default retry policy (10 retries with backoff)
    makes one command against a dead server take ~4 s, far too long for a request path.
    ``cluster``: ``url`` is one node of a Redis Cluster, which redis-py discovers from it."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                               "retry": Retry(NoBackoff(), retries)}
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


@dataclass(frozen=True)
class VersionKey:
    """Identifies one model version's content: the same name and version number trained twice
    have different fingerprints, so they never share cache entries."""

    model_name: str
    version: int
    fingerprint: str  # hex digest of the version's content (computed elsewhere)

    def describe(self) -> str:
        return f"{self.model_name}/{self.version}@{self.fingerprint[:12]}"


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was created, for the caller's metrics."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    stored: int = 0
    store_failures: int = 0
    redis_errors: int = 0


class RedisSkipped(redis.ConnectionError):
    """Raised internally while the cache is backing off after a Redis error."""


class CorruptEntry(Exception):
    """An entry that exists but cannot be trusted; the message names what failed."""


class EntryChanged(Exception):
    """The entry was rewritten while it was being read."""


@dataclass(frozen=True)
class Manifest:
    count: int
    dim: int
    chunks: int
    chunk_bytes: int
    checksum: str
    ids_digest: str

    @property
    def nbytes(self) -> int:
        return self.count * self.dim * 4

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """Validates everything that can be checked before the chunks are read."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptEntry(f"manifest is not JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise CorruptEntry("manifest is not a JSON object")
        if doc.get("format") != FORMAT_VERSION:
            raise CorruptEntry(f"manifest format {doc.get('format')!r} != {FORMAT_VERSION}")
        if doc.get("dtype") != DTYPE:
            raise CorruptEntry(f"manifest dtype {doc.get('dtype')!r} != {DTYPE!r}")
        manifest = cls(count=_field(doc, "count", int), dim=_field(doc, "dim", int),
                       chunks=_field(doc, "chunks", int),
                       chunk_bytes=_field(doc, "chunk_bytes", int),
                       checksum=_field(doc, "checksum", str),
                       ids_digest=_field(doc, "ids_digest", str))
        manifest._check_layout()
        return manifest

    def _check_layout(self) -> None:
        # Bounds the chunk read so that a damaged manifest cannot ask for millions of fields.
        if min(self.count, self.dim) < 0 or self.chunk_bytes < 1:
            raise CorruptEntry("manifest has a negative size or chunk_bytes < 1")
        if self.chunks != math.ceil(self.nbytes / self.chunk_bytes) or self.chunks > MAX_CHUNKS:
            raise CorruptEntry(f"manifest chunks={self.chunks} does not fit "
                               f"{self.nbytes} bytes in chunks of {self.chunk_bytes}")
        if not self.checksum.startswith(CHECKSUM_PREFIX):
            raise CorruptEntry(f"manifest checksum {self.checksum[:16]!r} is not sha256")

    def chunk_size(self, index: int) -> int:
        return min(self.chunk_bytes, self.nbytes - index * self.chunk_bytes)

    def decode(self, groups: Iterable[list[bytes | None]]) -> np.ndarray:
        """The matrix its chunks hold (groups of them, in order), after checking each chunk's
        presence and size and the whole checksum. Each group is copied into place and dropped
        before the next is read, so the read costs the matrix plus one group, not the matrix
        twice (a 1M x 64 matrix is 256 MB)."""
        data = np.empty(self.nbytes, dtype=np.uint8)
        digest, index = hashlib.sha256(), 0
        for group in groups:
            for chunk in group:
                if chunk is None:
                    raise CorruptEntry(f"chunk {index} of {self.chunks} is missing")
                offset, size = index * self.chunk_bytes, self.chunk_size(index)
                if len(chunk) != size:
                    raise CorruptEntry(f"chunk {index} has {len(chunk)} bytes, the manifest "
                                       f"({self.count}x{self.dim}x4 in {self.chunk_bytes}-byte "
                                       f"chunks) says {size}")
                data[offset:offset + size] = np.frombuffer(chunk, dtype=np.uint8)
                digest.update(chunk)
                index += 1
        if CHECKSUM_PREFIX + digest.hexdigest() != self.checksum:
            raise CorruptEntry("checksum mismatch")
        matrix = data.view(DTYPE).reshape(self.count, self.dim)
        matrix.flags.writeable = False
        return matrix


def _field(doc: dict[str, Any], name: str, kind: type[T]) -> T:
    value = doc.get(name)
    # bool is an int subclass; a manifest saying "count": true is damaged, not 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptEntry(f"manifest field {name!r} is {value!r}, expected {kind.__name__}")
    return value


def _checksum(data: bytes | memoryview) -> str:
    return CHECKSUM_PREFIX + hashlib.sha256(data).hexdigest()


def as_matrix(values: np.ndarray) -> np.ndarray:
    """A read-only C-contiguous '<f4' [count, dim] view (a copy only when dtype/layout differ)."""
    matrix = np.ascontiguousarray(values, dtype=DTYPE)
    if matrix.ndim != 2:
        raise ValueError(f"item matrix must be 2-D [count, dim], got shape {matrix.shape}")
    view = matrix.view()
    view.flags.writeable = False  # on a view, so the caller's own array stays writable
    return view


class ItemMatrixCache:
    """Item matrices shared between processes through Redis; see the module docstring."""

    def __init__(self, client: RedisClient, prefix: str = "recsys:", chunk_bytes: int = 4 << 20,
                 lock_timeout_s: float = 120.0, wait_timeout_s: float = 300.0,
                 ttl_s: int | None = None, error_backoff_s: float = 2.0) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain braces (they set the hash tag)")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must return bytes (decode_responses=False)")
        self.client = client
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.lock_timeout_s = lock_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.ttl_s = ttl_s
        self.error_backoff_s = error_backoff_s
        self._mutex = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(CacheStats)), 0)
        self._last_error: str | None = None
        self._skip_until = 0.0

    # ---- keys -------------------------------------------------------------------------------

    def key(self, version: VersionKey, *parts: str) -> str:
        """THE one function that formats keys: `prefix{name:version:fingerprint}:part:...`."""
        if not parts or not all(_PART_RE.match(part) for part in parts):
            raise ValueError(f"key parts must be non-empty [A-Za-z0-9_.-]+, got {parts!r}")
        return f"{self._tag(version)}:{':'.join(parts)}"

    def _tag(self, version: VersionKey) -> str:
        if not isinstance(version.version, int) or isinstance(version.version, bool):
            raise ValueError(f"version must be an int, got {version.version!r}")
        name = escape_component(version.model_name)
        fingerprint = escape_component(version.fingerprint)  # a no-op for a hex digest
        return f"{self.prefix}{{{name}:{version.version}:{fingerprint}}}"

    # ---- state for the caller's metrics and readiness ---------------------------------------

    @property
    def stats(self) -> CacheStats:
        with self._mutex:
            return CacheStats(**self._counts)

    @property
    def last_error(self) -> str | None:
        """What the last operation's Redis error was; None when it reached Redis fine."""
        return self._last_error

    @property
    def degraded(self) -> bool:
        return self._last_error is not None

    def ping(self) -> bool:
        """Whether Redis answers now (for readiness); a success clears the degraded state."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self._last_error = f"ping: {type(exc).__name__}: {exc}"
            return False
        self._last_error = None
        self._skip_until = 0.0
        return True

    def _count(self, name: str, n: int = 1) -> None:
        with self._mutex:
            self._counts[name] += n

    def _guarded(self, op: str, version: VersionKey, action: Callable[[], T], fallback: T) -> T:
        """Runs `action` against Redis; a Redis error becomes `fallback` plus a warning."""
        try:
            if time.monotonic() < self._skip_until:
                raise RedisSkipped(f"skipped: Redis failed less than {self.error_backoff_s}s ago")
            result = action()
        except redis.RedisError as exc:
            self._record_error(op, version, exc)
            return fallback
        self._last_error = None
        return result

    def _record_error(self, op: str, version: VersionKey, exc: redis.RedisError) -> None:
        if isinstance(exc, RedisSkipped):
            # Keep the error that started the backoff: it says what is actually wrong.
            self._last_error = self._last_error or f"{op}: {exc}"
            return  # already logged and counted when the backoff started
        self._last_error = f"{op}: {type(exc).__name__}: {exc}"
        self._count("redis_errors")
        self._skip_until = time.monotonic() + self.error_backoff_s
        log.warning("item cache: %s for %s failed, using local data: %s: %s",
                    op, version.describe(), type(exc).__name__, exc)

    # ---- load -------------------------------------------------------------------------------

    def contains(self, version: VersionKey) -> bool:
        """Whether a version's entry is there (its manifest exists), without reading it."""
        return self._guarded("contains", version, lambda: bool(
            self.client.exists(self.key(version, "items", "manifest"))), False)

    def load(self, version: VersionKey, ids_digest: str) -> np.ndarray | None:
        """The stored matrix (read-only '<f4' [count, dim]) or None when missing, corrupt or
        unreachable. Two round trips: the manifest, then manifest + chunks in one MULTI."""
        matrix = self._guarded("load", version, lambda: self._load(version, ids_digest), None)
        self._count("hits" if matrix is not None else "misses")
        return matrix

    def _load(self, version: VersionKey, ids_digest: str, attempts: int = 3) -> np.ndarray | None:
        for _ in range(attempts):
            raw = self.client.get(self.key(version, "items", "manifest"))
            if raw is None:
                return None
            try:
                manifest = Manifest.parse(raw)
                if manifest.ids_digest != ids_digest:
                    raise CorruptEntry(f"ids_digest {manifest.ids_digest[:16]!r} != "
                                       f"{ids_digest[:16]!r} (a different item order)")
                return manifest.decode(self._read_chunks(version, manifest, raw))
            except EntryChanged:
                continue  # rewritten while we read it: read the new one
            except CorruptEntry as exc:
                self._discard_corrupt(version, raw, str(exc))
                return None
        return None

    def _read_chunks(self, version: VersionKey, manifest: Manifest,
                     raw: bytes) -> Iterator[list[bytes | None]]:
        """The chunks, READ_GROUP_CHUNKS at a time, each group read atomically with the
        manifest; EntryChanged when the manifest is no longer `raw` (a rewrite replaces the
        whole entry in one MULTI, so groups read under one manifest belong together)."""
        chunks_key, manifest_key = (self.key(version, "items", "chunks"),
                                    self.key(version, "items", "manifest"))
        for first in range(0, manifest.chunks, READ_GROUP_CHUNKS):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(manifest_key)
            pipe.hmget(chunks_key, [str(i) for i in range(
                first, min(first + READ_GROUP_CHUNKS, manifest.chunks))])
            current, chunks = pipe.execute()
            if current != raw:
                raise EntryChanged
            yield list(chunks)

    def _discard_corrupt(self, version: VersionKey, raw: bytes, reason: str) -> None:
        log.warning("item cache: entry for %s is corrupt (%s); deleting it",
                    version.describe(), reason)
        self._count("corrupt")
        manifest_key = self.key(version, "items", "manifest")
        # Compare-and-delete: a writer may have replaced the entry since we read it.
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(manifest_key)
                if pipe.get(manifest_key) != raw:
                    return
                pipe.multi()
                pipe.delete(manifest_key, self.key(version, "items", "chunks"))
                pipe.execute()
            except redis.WatchError:
                pass

    # ---- store ------------------------------------------------------------------------------

    def store(self, version: VersionKey, matrix: np.ndarray, ids_digest: str) -> bool:
        """Chunks and manifest in one MULTI/EXEC; False (logged, counted) on a Redis error."""
        values = as_matrix(matrix)
        stored = self._guarded("store", version,
                               lambda: self._store(version, values, ids_digest), False)
        self._count("stored" if stored else "store_failures")
        return stored

    def _store(self, version: VersionKey, matrix: np.ndarray, ids_digest: str) -> bool:
        data = matrix.reshape(-1).view(np.uint8).data  # the raw '<f4' bytes, without a copy
        chunk_bytes = max(self.chunk_bytes, math.ceil(len(data) / MAX_CHUNKS))
        chunks_key = self.key(version, "items", "chunks")
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(chunks_key)
        for index, start in enumerate(range(0, len(data), chunk_bytes)):
            # One HSET per chunk keeps every command small (Redis limits one request's size).
            # memoryview slices: redis-py's encoder sends them as they are (its type hints
            # omit memoryview), so the matrix is never copied.
            pipe.hset(chunks_key, str(index),
                      data[start:start + chunk_bytes])  # type: ignore[call-overload]
        if self.ttl_s is not None and len(data):
            pipe.expire(chunks_key, self.ttl_s)
        manifest = {"format": FORMAT_VERSION, "count": matrix.shape[0], "dim": matrix.shape[1],
                    "dtype": DTYPE, "checksum": _checksum(data),
                    "chunks": math.ceil(len(data) / chunk_bytes), "chunk_bytes": chunk_bytes,
                    "ids_digest": ids_digest, "created_at": datetime.now(UTC).isoformat()}
        pipe.set(self.key(version, "items", "manifest"), json.dumps(manifest), ex=self.ttl_s)
        pipe.execute()
        return True

    # ---- get_or_compute ---------------------------------------------------------------------

    def get_or_compute(self, version: VersionKey, ids_digest: str,
                       compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, Source]:
        """The shared matrix, computed by exactly one process under a lock with an expiry while
        the others wait for it. Never raises a Redis error: without Redis it computes locally."""
        shared = self._guarded("get_or_compute", version,
                               lambda: self._shared(version, ids_digest, compute), None)
        # None: Redis failed, so compute locally and store nothing.
        found = shared if shared is not None else (as_matrix(compute()), "computed")
        self._count("hits" if found[1] == "redis" else "misses")
        return found

    def _shared(self, version: VersionKey, ids_digest: str,
                compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, Source]:
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            matrix = self._load(version, ids_digest)
            if matrix is not None:
                return matrix, "redis"
            lock = self._lock(version)
            if lock.acquire(blocking=False):
                return self._compute_holding(lock, version, ids_digest, compute)
            matrix = self._wait_for_entry(version, ids_digest, deadline)
            if matrix is not None:
                return matrix, "redis"
            if time.monotonic() >= deadline:
                log.warning("item cache: waited %.0fs for another process to compute %s; "
                            "computing locally", self.wait_timeout_s, version.describe())
                return as_matrix(compute()), "computed"
            # The lock vanished without an entry: its holder died. Try to take over.

    def _lock(self, version: VersionKey) -> Lock:
        return self.client.lock(self.key(version, "items", "lock"), timeout=self.lock_timeout_s,
                                blocking=False)

    def _compute_holding(self, lock: Lock, version: VersionKey, ids_digest: str,
                         compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, Source]:
        try:
            # Another process may have stored it between our miss and our lock.
            matrix = self._load(version, ids_digest)
            if matrix is not None:
                return matrix, "redis"
            matrix = as_matrix(compute())
            self._store_reporting(version, matrix, ids_digest)
            return matrix, "computed"
        finally:
            self._release(lock, version)

    def _store_reporting(self, version: VersionKey, matrix: np.ndarray, ids_digest: str) -> None:
        """Stores, turning a failure into a warning: the computed matrix is still good."""
        try:
            self._store(version, matrix, ids_digest)
        except redis.RedisError as exc:
            self._count("store_failures")
            log.warning("item cache: storing %s failed; serving it from memory only: %s: %s",
                        version.describe(), type(exc).__name__, exc)
            return
        self._count("stored")

    def _release(self, lock: Lock, version: VersionKey) -> None:
        try:
            lock.release()
        except redis.RedisError as exc:
            # Usually the lock expired during a long compute (raise lock_timeout_s if so).
            log.warning("item cache: releasing the lock of %s failed: %s: %s",
                        version.describe(), type(exc).__name__, exc)

    def _wait_for_entry(self, version: VersionKey, ids_digest: str,
                        deadline: float) -> np.ndarray | None:
        """Polls until the entry appears (it), the lock disappears or the deadline (None)."""
        lock_key = self.key(version, "items", "lock")
        while time.monotonic() < deadline:
            time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
            matrix = self._load(version, ids_digest)
            if matrix is not None:
                return matrix
            if not self.client.exists(lock_key):
                return None
        return None

    # ---- delete -----------------------------------------------------------------------------

    def delete(self, version: VersionKey) -> int:
        """Removes every key of this version (items, lock, versioned hashes); 0 on a Redis error."""
        return self._guarded("delete", version, lambda: self._delete(version), 0)

    def _delete(self, version: VersionKey) -> int:
        removed = 0
        for batch in _batches(self.client.scan_iter(match=self.pattern(version), count=1000), 500):
            removed += int(self.client.unlink(*batch))
        return removed

    def pattern(self, version: VersionKey) -> str:
        """A SCAN/KEYS pattern matching exactly this version's keys."""
        return _GLOB_SPECIAL_RE.sub(r"\\\1", self._tag(version)) + ":*"


def _batches(items: Iterator[T] | list[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class VersionedHash:
    """A per-version HASH of field -> bytes (e.g. the user table: user_id -> JSON bytes).

    Field names are arbitrary strings: they are hash fields, never key names, so they cannot
    address another key. Redis errors are handled like the cache's (logged, counted, reflected
    in `cache.degraded`): `get` answers None, `is_complete` False, `put_many` False.
    """

    def __init__(self, client: RedisClient, cache: ItemMatrixCache, name: str) -> None:
        if not _PART_RE.match(name):
            raise ValueError(f"name must be [A-Za-z0-9_.-]+, got {name!r}")
        self.client = client
        self.cache = cache
        self.name = name

    def key(self, version: VersionKey) -> str:
        return self.cache.key(version, self.name)

    def marker_key(self, version: VersionKey) -> str:
        return self.cache.key(version, self.name, "complete")

    def put_many(self, version: VersionKey,
                 entries: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> bool:
        """HSETs of ~10k fields, pipelined, then the "complete" marker; False on a Redis error.
        ``entries`` may be a lazy iterable, so that a large table is never all in memory."""
        pairs = iter(entries.items()) if isinstance(entries, Mapping) else iter(entries)
        return self.cache._guarded(f"{self.name}.put_many", version,
                                   lambda: self._put_many(version, pairs), False)

    def _put_many(self, version: VersionKey, pairs: Iterator[tuple[str, bytes]]) -> bool:
        key, ttl = self.key(version), self.cache.ttl_s
        self.client.delete(self.marker_key(version))  # readers must not trust a partial write
        written = 0
        for group in _batches(_batches(pairs, HSET_BATCH_FIELDS), 10):
            pipe = self.client.pipeline(transaction=False)
            for batch in group:
                pipe.hset(key, mapping=dict(batch))
                written += len(batch)
            pipe.execute()
        pipe = self.client.pipeline(transaction=True)
        if ttl is not None and written:
            pipe.expire(key, ttl)
        marker = {"fields": written, "created_at": datetime.now(UTC).isoformat()}
        pipe.set(self.marker_key(version), json.dumps(marker), ex=ttl)
        pipe.execute()
        return True

    def get(self, version: VersionKey, field: str) -> bytes | None:
        """One HGET; None for a miss (or a Redis error), never b""."""
        return self.cache._guarded(f"{self.name}.get", version,
                                   lambda: self.client.hget(self.key(version), field), None)

    def is_complete(self, version: VersionKey) -> bool:
        return self.cache._guarded(
            f"{self.name}.is_complete", version,
            lambda: bool(self.client.exists(self.marker_key(version))), False)
