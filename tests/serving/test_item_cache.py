"""ItemMatrixCache and VersionedHash against a real private Redis (see tests/conftest.py)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from service.redis_server import EmbeddedRedis, free_port
from service.serving.item_cache import (
    ItemMatrixCache,
    VersionedHash,
    VersionKey,
    connect,
    escape_component,
)

V1 = VersionKey("default", 3, "ab12cd34")
IDS = "ids-sha256-0001"


def random_matrix(rows: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


class CountingCompute:
    """A compute function that records how often it ran (thread-safe)."""

    def __init__(self, matrix: np.ndarray, sleep_s: float = 0.0) -> None:
        self.matrix = matrix
        self.sleep_s = sleep_s
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> np.ndarray:
        with self._lock:
            self.calls += 1
        time.sleep(self.sleep_s)
        return self.matrix


@pytest.fixture
def cache(redis_client: redis.Redis) -> ItemMatrixCache:
    return ItemMatrixCache(redis_client)


@pytest.fixture
def make_cache(redis_url: str,
               redis_client: redis.Redis) -> Iterator[Callable[..., ItemMatrixCache]]:
    """Caches on their own clients, as separate processes would have (on a flushed db)."""
    clients: list[redis.Redis] = []

    def make(**kwargs: object) -> ItemMatrixCache:
        clients.append(redis.Redis.from_url(redis_url))
        return ItemMatrixCache(clients[-1], **kwargs)  # type: ignore[arg-type]

    yield make
    for client in clients:
        client.close()


def present(value: bytes | None) -> bytes:
    assert value is not None
    return value


def all_keys(client: redis.Redis) -> set[str]:
    return {key.decode() for key in client.scan_iter(count=1000)}


# ---- keys ------------------------------------------------------------------------------------


def test_key_format(cache: ItemMatrixCache) -> None:
    assert cache.key(V1, "items", "manifest") == "recsys:{default:3:ab12cd34}:items:manifest"


def test_hostile_model_names_never_collide(cache: ItemMatrixCache) -> None:
    names = ["a", "a:3", "a:3:ff", "a}:3:ff", "{a}", "a*", "*", "a b", "a%3A3", "a\n", "ключ",
             "", "a:3:ff}:items", "default", "Default"]
    versions = [VersionKey(n, v, f) for n, v, f in itertools.product(names, [3, 33], ["ff", "f"])]
    keys = [cache.key(v, "items", "manifest") for v in versions]
    assert len(set(keys)) == len(keys)
    for version, key in zip(versions, keys, strict=True):
        # The hash tag is the text between the first "{" and the next "}": exactly one version.
        tag = key[key.index("{") + 1:key.index("}")]
        name = escape_component(version.model_name)
        assert tag == f"{name}:{version.version}:{version.fingerprint}"
        assert key.count("{") == key.count("}") == 1
        assert not set("*?[]\\ \n") & set(key)


def test_key_rejects_ambiguous_parts_and_prefixes(redis_client: redis.Redis) -> None:
    cache = ItemMatrixCache(redis_client)
    for parts in [(), ("a:b",), ("",), ("a*",)]:
        with pytest.raises(ValueError):
            cache.key(V1, *parts)
    with pytest.raises(ValueError):
        ItemMatrixCache(redis_client, prefix="x{y}:")


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "dim", "chunk_bytes"),
                         [(10_000, 64, 4 << 20), (1_000, 16, 4_096), (0, 64, 4 << 20)])
def test_round_trip_is_byte_exact(make_cache: Callable[..., ItemMatrixCache], rows: int,
                                  dim: int, chunk_bytes: int) -> None:
    writer = make_cache(chunk_bytes=chunk_bytes)
    reader = make_cache()  # another process, with its own client and default chunk size
    matrix = random_matrix(rows, dim)
    assert writer.store(V1, matrix, IDS)

    loaded = reader.load(V1, IDS)
    assert loaded is not None
    assert loaded.shape == (rows, dim) and loaded.dtype == np.float32
    assert loaded.tobytes() == matrix.tobytes()
    assert loaded.flags.c_contiguous and not loaded.flags.writeable
    manifest = json.loads(present(writer.client.get(writer.key(V1, "items", "manifest"))))
    assert manifest["chunks"] == -(-rows * dim * 4 // chunk_bytes)
    assert manifest["count"] == rows and manifest["dtype"] == "<f4"


def test_an_entry_rewritten_while_it_is_read_is_read_again_whole(
        make_cache: Callable[..., ItemMatrixCache], monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks are read a group at a time (READ_GROUP_CHUNKS), so that a read never holds the
    matrix twice. Another writer's store between two groups replaces the whole entry: the read
    starts again, and the result is one matrix, never a mix of two."""
    writer, reader = make_cache(chunk_bytes=4_096), make_cache()
    old, new = random_matrix(1_000, 16, seed=1), random_matrix(1_000, 16, seed=2)  # 16 chunks
    assert writer.store(V1, old, IDS)
    read_chunks = ItemMatrixCache._read_chunks
    groups = 0

    def rewritten_after_the_first_group(self: ItemMatrixCache, *args: object
                                        ) -> Iterator[list[bytes | None]]:
        nonlocal groups
        for group in read_chunks(self, *args):  # type: ignore[arg-type]
            groups += 1
            if groups == 1:
                assert writer.store(V1, new, IDS)
            yield group

    monkeypatch.setattr(ItemMatrixCache, "_read_chunks", rewritten_after_the_first_group)
    loaded = reader.load(V1, IDS)
    assert loaded is not None and loaded.tobytes() == new.tobytes()
    assert groups == 3  # one group of the abandoned read, then the new entry's two
    assert reader.stats.corrupt == 0


def test_float64_input_is_stored_as_float32(cache: ItemMatrixCache) -> None:
    matrix = np.random.default_rng(1).standard_normal((50, 8))
    cache.store(V1, matrix, IDS)
    loaded = cache.load(V1, IDS)
    assert loaded is not None and loaded.tobytes() == matrix.astype("<f4").tobytes()


def test_store_rejects_a_non_matrix(cache: ItemMatrixCache) -> None:
    with pytest.raises(ValueError, match="2-D"):
        cache.store(V1, np.zeros(10, dtype=np.float32), IDS)


def test_versions_fingerprints_and_names_never_share_entries(cache: ItemMatrixCache) -> None:
    cache.store(V1, random_matrix(10), IDS)
    others = [VersionKey("default", 4, V1.fingerprint), VersionKey("default", 3, "ab12cd35"),
              VersionKey("other", 3, V1.fingerprint), VersionKey("default:3", 3, V1.fingerprint)]
    for other in others:
        assert cache.load(other, IDS) is None
        cache.store(other, random_matrix(10, seed=other.version), IDS)

    assert cache.delete(others[0]) == 2  # its manifest and its chunks
    assert cache.load(others[0], IDS) is None
    loaded = cache.load(V1, IDS)
    assert loaded is not None and loaded.tobytes() == random_matrix(10).tobytes()
    assert cache.stats.misses == len(others) + 1 and cache.stats.stored == len(others) + 1


def test_get_or_compute_hit_does_not_compute(cache: ItemMatrixCache) -> None:
    matrix = random_matrix(20)
    compute = CountingCompute(matrix)
    first, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "computed" and compute.calls == 1 and not first.flags.writeable
    second, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "redis" and compute.calls == 1
    assert second.tobytes() == matrix.tobytes()
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stored) == (1, 1, 1)
    assert not cache.degraded


def test_ttl_is_applied_to_every_key(redis_client: redis.Redis) -> None:
    cache = ItemMatrixCache(redis_client, ttl_s=60)
    users = VersionedHash(redis_client, cache, "users")
    cache.store(V1, random_matrix(10), IDS)
    users.put_many(V1, {"u1": b"{}"})
    keys = all_keys(redis_client)
    assert len(keys) == 4
    assert all(0 < redis_client.ttl(key) <= 60 for key in keys)

    plain = ItemMatrixCache(redis_client)
    plain.store(VersionKey("other", 1, "ff"), random_matrix(10), IDS)
    assert redis_client.ttl(plain.key(VersionKey("other", 1, "ff"), "items", "manifest")) == -1


# ---- corruption ------------------------------------------------------------------------------


def flip_byte(client: redis.Redis, cache: ItemMatrixCache) -> None:
    chunks = cache.key(V1, "items", "chunks")
    data = bytearray(present(client.hget(chunks, "1")))
    data[100] ^= 0x01
    client.hset(chunks, "1", bytes(data))


def truncate_chunk(client: redis.Redis, cache: ItemMatrixCache) -> None:
    chunks = cache.key(V1, "items", "chunks")
    client.hset(chunks, "2", present(client.hget(chunks, "2"))[:-4])


def delete_chunk(client: redis.Redis, cache: ItemMatrixCache) -> None:
    client.hdel(cache.key(V1, "items", "chunks"), "0")


def garbage_manifest(client: redis.Redis, cache: ItemMatrixCache) -> None:
    client.set(cache.key(V1, "items", "manifest"), b"\x80\x04garbage")


def edit_manifest(**changes: object) -> Callable[[redis.Redis, ItemMatrixCache], None]:
    def edit(client: redis.Redis, cache: ItemMatrixCache) -> None:
        key = cache.key(V1, "items", "manifest")
        client.set(key, json.dumps({**json.loads(present(client.get(key))), **changes}))

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[redis.Redis, ItemMatrixCache], None], str]] = {
    "flipped byte": (flip_byte, "checksum"),
    "truncated chunk": (truncate_chunk, "bytes"),
    "deleted chunk": (delete_chunk, "missing"),
    "garbage manifest": (garbage_manifest, "not JSON"),
    "wrong dtype": (edit_manifest(dtype="<f8"), "dtype"),
    "wrong count": (edit_manifest(count=999), "chunks="),
    "count off by one": (edit_manifest(count=99), "bytes"),
    "wrong format": (edit_manifest(format=2), "format"),
    "wrong ids_digest": (edit_manifest(ids_digest="another-order"), "ids_digest"),
    "boolean dim": (edit_manifest(dim=True), "'dim'"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_entry_is_reported_deleted_and_recomputed(
        redis_client: redis.Redis, corruption: str, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, reason = CORRUPTIONS[corruption]
    cache = ItemMatrixCache(redis_client, chunk_bytes=4_096)
    matrix = random_matrix(100, 32)  # 12,800 bytes: 4 chunks
    cache.store(V1, matrix, IDS)
    corrupt(redis_client, cache)

    assert cache.load(V1, IDS) is None
    assert cache.stats.corrupt == 1
    assert reason in caplog.text
    assert all_keys(redis_client) == set()  # the whole entry is gone

    compute = CountingCompute(matrix)
    recomputed, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "computed" and compute.calls == 1
    loaded = cache.load(V1, IDS)
    assert loaded is not None and loaded.tobytes() == recomputed.tobytes() == matrix.tobytes()


def test_other_item_order_is_not_served(cache: ItemMatrixCache) -> None:
    cache.store(V1, random_matrix(10), IDS)
    assert cache.load(V1, "a-different-ids-digest") is None
    assert cache.load(V1, IDS) is None  # deleted: the next store writes the right order


# ---- lock ------------------------------------------------------------------------------------


def test_concurrent_callers_compute_once(make_cache: Callable[..., ItemMatrixCache]) -> None:
    caches = [make_cache() for _ in range(4)]
    compute = CountingCompute(random_matrix(2_000), sleep_s=0.5)
    start = threading.Barrier(len(caches))
    results: list[tuple[np.ndarray, str]] = []

    def run(cache: ItemMatrixCache) -> None:
        start.wait()
        results.append(cache.get_or_compute(V1, IDS, compute))

    threads = [threading.Thread(target=run, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert compute.calls == 1
    assert sorted(source for _, source in results) == ["computed", "redis", "redis", "redis"]
    assert all(matrix.tobytes() == compute.matrix.tobytes() for matrix, _ in results)
    assert not caches[0].client.exists(caches[0].key(V1, "items", "lock"))


def test_waiter_takes_over_from_a_dead_holder(cache: ItemMatrixCache) -> None:
    dead = cache.client.lock(cache.key(V1, "items", "lock"), timeout=0.5)
    assert dead.acquire(blocking=False)  # and never released: the holder "crashed"
    compute = CountingCompute(random_matrix(10))
    started = time.monotonic()
    matrix, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "computed" and compute.calls == 1
    assert time.monotonic() - started >= 0.4
    loaded = cache.load(V1, IDS)
    assert loaded is not None and loaded.tobytes() == matrix.tobytes()


def test_wait_timeout_computes_locally_without_storing(
        make_cache: Callable[..., ItemMatrixCache]) -> None:
    cache = make_cache(wait_timeout_s=0.3)
    holder = cache.client.lock(cache.key(V1, "items", "lock"), timeout=30)
    assert holder.acquire(blocking=False)  # a live holder that is too slow
    compute = CountingCompute(random_matrix(10))
    _, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "computed" and compute.calls == 1
    assert cache.load(V1, IDS) is None
    holder.release()


# ---- Redis failures --------------------------------------------------------------------------


def test_unreachable_redis_falls_back_quickly() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    cache = ItemMatrixCache(client)
    users = VersionedHash(client, cache, "users")
    compute = CountingCompute(random_matrix(10))
    started = time.monotonic()

    matrix, source = cache.get_or_compute(V1, IDS, compute)
    assert source == "computed" and compute.calls == 1
    assert matrix.tobytes() == compute.matrix.tobytes()
    assert cache.degraded and "ConnectionError" in (cache.last_error or "")
    assert cache.load(V1, IDS) is None
    assert cache.store(V1, matrix, IDS) is False
    assert cache.delete(V1) == 0
    assert users.get(V1, "u1") is None and not users.is_complete(V1)
    assert users.put_many(V1, {"u1": b"{}"}) is False
    assert time.monotonic() - started < 2.0
    assert "ConnectionError" in (cache.last_error or "")  # the cause, not "skipped"
    assert cache.stats.redis_errors == 1  # later calls skipped Redis during the backoff
    assert cache.stats.store_failures == 1


def test_recovers_after_a_redis_restart() -> None:
    server = EmbeddedRedis().start()
    try:
        client = connect(server.url, timeout_s=0.5)
        cache = ItemMatrixCache(client, error_backoff_s=0.1)
        cache.store(V1, random_matrix(10), IDS)
        server.stop()
        assert cache.load(V1, IDS) is None and cache.degraded
        server = EmbeddedRedis(port=server.port).start()  # empty again: nothing is persisted
        time.sleep(0.15)
        _, source = cache.get_or_compute(V1, IDS, CountingCompute(random_matrix(10)))
        assert source == "computed" and not cache.degraded
        assert cache.load(V1, IDS) is not None
    finally:
        server.stop()


def test_rejects_a_decoding_client(redis_url: str) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        ItemMatrixCache(redis.Redis.from_url(redis_url, decode_responses=True))


# ---- VersionedHash ---------------------------------------------------------------------------

HOSTILE_FIELDS = ["*", "?", "a:b", "with space", "new\nline", "{tag}", "}{", "ключ", "🙂", "",
                  "recsys:{default:3:ab12cd34}:items:manifest", "users:complete", "\\x00"]


def test_versioned_hash_round_trip_with_hostile_fields(redis_client: redis.Redis,
                                                       cache: ItemMatrixCache) -> None:
    users = VersionedHash(redis_client, cache, "users")
    mapping = {name: json.dumps({"id": name}).encode() for name in HOSTILE_FIELDS}
    mapping.update({f"user-{i}": f"{i}".encode() for i in range(25_000)})  # several batches
    assert not users.is_complete(V1)
    assert users.put_many(V1, mapping)

    assert users.is_complete(V1)
    assert all(users.get(V1, name) == mapping[name] for name in HOSTILE_FIELDS)
    assert users.get(V1, "user-24999") == b"24999"
    assert users.get(V1, "missing") is None
    assert users.get(VersionKey("default", 4, V1.fingerprint), "*") is None
    # Field names address nothing: only the hash and its marker exist.
    assert all_keys(redis_client) == {users.key(V1), users.marker_key(V1)}
    assert cache.delete(V1) == 2 and not users.is_complete(V1)


def test_versioned_hash_empty_table_is_complete(redis_client: redis.Redis,
                                                cache: ItemMatrixCache) -> None:
    users = VersionedHash(redis_client, cache, "users")
    assert users.put_many(V1, {}) and users.is_complete(V1)
    assert users.get(V1, "u1") is None


def test_versioned_hash_name_must_be_a_plain_part(redis_client: redis.Redis,
                                                  cache: ItemMatrixCache) -> None:
    with pytest.raises(ValueError):
        VersionedHash(redis_client, cache, "users:complete")
