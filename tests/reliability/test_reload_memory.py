"""Memory across reloads, measured on a real `recsys-serve` process: ten reloads (versions
2..11, each a copy of version 1 published as an exporter publishes it) leave the resident set
within 10% of what it was after the first."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import psutil
import pytest

from tests.serving.helpers import Server, make_settings, started_client

from .conftest import (
    MODEL,
    copy_store,
    publish_version,
    redis_db_url,
    serve_process,
    server_env,
    wait_for,
)

RELOADS = 10
MEMORY_DB = 6  # a database of the session Redis that no other test uses


def exercise(server: Server, version: int) -> None:
    """Requests on the new version, so that its request paths (and TF's per-function state) are
    paid for before memory is measured."""
    for n in range(10):
        body = server.post("/v1/recommend", {"user": {"id": f"u{n + 1}"}, "k": 10})
        assert body["model"]["version"] == version
    for user in ({"id": "u1"}, {"features": {"age": 30, "gender": "F"}}):
        body = server.post("/v1/score", {"user": user, "item_ids": ["i1", "i2", "nope"]})
        assert body["model"]["version"] == version


@pytest.mark.timeout(300)
def test_memory_is_flat_over_ten_reloads(tmp_path: Path, model_store: Path,
                                         redis_url: str) -> None:
    store = copy_store(model_store, tmp_path / "store")
    model_dir = store / MODEL
    env = server_env(store, redis_db_url(redis_url, MEMORY_DB))
    with serve_process(env, tmp_path / "server.log") as server:
        process = psutil.Process(server.process.pid)
        exercise(server, 1)
        rss: dict[int, int] = {}
        for version in range(2, 2 + RELOADS):
            publish_version(model_dir, version)
            body = server.post("/v1/admin/reload", {})
            assert body == {"model": {"name": MODEL, "version": version}, "changed": True}
            exercise(server, version)
            rss[version] = process.memory_info().rss
        assert server.get("/v1/model").json()["version"] == 1 + RELOADS
        log = server.log()

    first, last = rss[2], rss[1 + RELOADS]
    trace = ", ".join(f"v{v}: {r / 2**20:.0f}" for v, r in rss.items())
    assert last <= first * 1.10, (f"RSS grew {last / first - 1:.0%} over {RELOADS - 1} reloads "
                                  f"after the first (MiB by version: {trace})\n{log}")


def test_the_heap_is_frozen_only_once_no_switched_out_version_is_held(
        store: Path, redis_url: str) -> None:
    """The loaded model sits outside the cyclic collector (gc.freeze), but a switched-out
    version that a request still holds is never frozen with it: its garbage would stay."""
    settings = make_settings(store, redis_url, precompute_users=False)
    with started_client(settings) as client:
        manager = client.app.state.manager  # type: ignore[attr-defined]
        # Readiness comes first; the collection and the freeze follow the switch.
        wait_for(gc.get_freeze_count, 30, "the heap frozen after the first load")
        assert not manager.retiring
        held = manager.current  # as a request still running on version 1 would
        version_1 = weakref.ref(held)
        publish_version(store / MODEL, 2)
        assert client.post("/v1/admin/reload").json()["changed"] is True
        assert manager.retiring and gc.get_freeze_count() == 0
        del held  # the request ends
        manager.release_retired()  # the next maintenance tick
        assert version_1() is None, "version 1 outlived its last request"
        assert not manager.retiring and gc.get_freeze_count() > 0
