"""Shared fixtures: a private real Redis server for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.redis_server import EmbeddedRedis

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server on a free port (never the machine's shared 6379)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A private three-node Redis Cluster; the URL of one node."""
    from tests.redis_cluster import EmbeddedRedisCluster

    with EmbeddedRedisCluster() as cluster:
        yield cluster.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the private server, flushed before each test that asks for it."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


# -- trained models --------------------------------------------------------------------------
# Really trained and exported, small enough to take seconds: every serving test uses these.

TINY_USERS = 400
TINY_ITEMS = 150


@pytest.fixture(scope="session")
def synthetic_dataset():  # type: ignore[no-untyped-def]
    from service.data.synthetic import generate_synthetic

    return generate_synthetic(TINY_USERS, TINY_ITEMS, seed=7)


def _train(store, dataset, arch: str):  # type: ignore[no-untyped-def]
    import keras

    from service.training.model import ModelConfig
    from service.training.pipeline import RunOptions, run
    from service.training.trainer import TrainConfig

    keras.utils.set_random_seed(0)
    options = RunOptions(model=ModelConfig(arch=arch),
                         train=TrainConfig(epochs=3, batch_size=256, patience=3))
    return run(dataset, store, "default", options, progress=lambda _line: None)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_dataset):  # type: ignore[no-untyped-def]
    """The default (interaction) model trained on tiny synthetic data: a RunResult whose
    version_dir is <store>/default/1."""
    return _train(tmp_path_factory.mktemp("store"), synthetic_dataset, "interaction")


@pytest.fixture(scope="session")
def trained_seed(tmp_path_factory, synthetic_dataset):  # type: ignore[no-untyped-def]
    """The write-up's seed model on the same data."""
    return _train(tmp_path_factory.mktemp("seed_store"), synthetic_dataset, "seed")


@pytest.fixture(scope="session")
def model_store(trained) -> Path:  # type: ignore[no-untyped-def]
    """A model store root holding one trained version: default/1 (treat as read-only)."""
    return Path(trained.version_dir).parent.parent
