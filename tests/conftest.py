"""Shared fixtures: a private real Redis server for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the private server, flushed before each test that asks for it."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
