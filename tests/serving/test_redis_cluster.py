"""The item cache on a real three-node Redis Cluster (tests/redis_cluster.py): a version's keys
share one slot, so the transactions, WATCH and multi-key deletes work; versions spread over the
nodes; replicas on separate clients compute a matrix once. The service end to end on a cluster:
tests/serving/test_processes.py."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from redis.cluster import RedisCluster

from service.redis_server import free_port
from service.serving.item_cache import (
    ItemMatrixCache,
    RedisClient,
    VersionedHash,
    VersionKey,
    connect,
)
from service.settings import Settings

from .helpers import serve_command, unique_prefix
from .test_item_cache import CountingCompute, random_matrix

IDS = "ids-sha256-cluster"


@pytest.fixture
def clients(redis_cluster_url: str) -> Iterator[list[RedisClient]]:
    made = [connect(redis_cluster_url, cluster=True) for _ in range(3)]
    yield made
    for client in made:
        client.close()


def test_connect_makes_a_cluster_client(clients: list[RedisClient]) -> None:
    assert isinstance(clients[0], RedisCluster)
    assert len(clients[0].get_primaries()) == 3


def test_a_versions_keys_share_one_slot_and_versions_spread(clients: list[RedisClient]) -> None:
    client = clients[0]
    assert isinstance(client, RedisCluster)
    cache = ItemMatrixCache(client, prefix=unique_prefix("slot"))
    nodes = set()
    for number in range(1, 13):
        version = VersionKey("default", number, f"{number:08x}")
        cache.get_or_compute(version, IDS, lambda: random_matrix(50, 8))
        assert VersionedHash(client, cache, "users").put_many(version, {"u1": b"{}"})
        keys = list(client.scan_iter(match=cache.pattern(version), count=1000))
        assert len(keys) == 4, keys  # manifest, chunks, users, users:complete
        slots = {client.keyslot(key) for key in keys}
        assert len(slots) == 1, keys
        nodes.add(client.get_node_from_key(keys[0]).name)
        assert cache.delete(version) == 4
        assert not list(client.scan_iter(match=cache.pattern(version)))
    assert len(nodes) >= 2, nodes  # the keys really live on several nodes
    assert cache.stats.redis_errors == 0


def test_replicas_compute_once_and_read_back(clients: list[RedisClient]) -> None:
    prefix = unique_prefix("once")
    caches = [ItemMatrixCache(client, prefix=prefix) for client in clients]
    version = VersionKey("default", 1, "c0ffee")
    compute = CountingCompute(random_matrix(3000, 16), sleep_s=0.3)
    results: list[tuple[np.ndarray, str]] = []
    threads = [threading.Thread(target=lambda c=c: results.append(
        c.get_or_compute(version, IDS, compute))) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert compute.calls == 1
    assert sorted(source for _, source in results) == ["computed", "redis", "redis"]
    for matrix, _ in results:
        np.testing.assert_array_equal(matrix, compute.matrix)
    assert all(cache.stats.redis_errors == 0 for cache in caches)


def test_a_corrupt_entry_is_deleted_and_recomputed(clients: list[RedisClient]) -> None:
    cache = ItemMatrixCache(clients[0], prefix=unique_prefix("corrupt"))
    version = VersionKey("default", 2, "beef")
    matrix = random_matrix(100, 8)
    cache.get_or_compute(version, IDS, lambda: matrix)
    clients[1].hset(cache.key(version, "items", "chunks"), "0", b"garbage")
    assert cache.load(version, IDS) is None
    assert cache.stats.corrupt == 1
    again, source = cache.get_or_compute(version, IDS, lambda: matrix)
    assert source == "computed"
    np.testing.assert_array_equal(again, matrix)


def test_cluster_needs_a_url() -> None:
    with pytest.raises(ValueError, match="RECSYS_REDIS_URL"):
        Settings(redis_cluster=True)
    assert Settings(redis_cluster=True, redis_url="redis://10.0.0.1:7000").redis_cluster


def test_recsys_serve_refuses_cluster_without_url() -> None:
    """A configuration error ends the command with status 2 and names the variable, before
    any server starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    done = subprocess.run([*serve_command(free_port())], env={**env, "RECSYS_REDIS_CLUSTER": "1"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "RECSYS_REDIS_CLUSTER needs RECSYS_REDIS_URL" in done.stderr
