"""Broken versions never reach traffic: each kind is refused with a log line and a count in
recsys_model_refusals_total while the current version keeps serving; a store of only broken
versions is not ready (but alive); a broken newest version at start leaves the older one served.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from tests.serving.helpers import (
    assert_error,
    make_settings,
    ok_json,
    started_client,
    wait_ready,
)

from .conftest import MODEL, next_version, publish_version, read_metric, wait_for

REFUSALS = "recsys_model_refusals"
SCORE_BODY = {"user": {"id": "u1"}, "item_ids": ["i1", "i2"]}
MANAGER_LOG = "service.serving.manager"


# ---- ways to break a version -------------------------------------------------------------------


def _edit_metadata(version_dir: Path, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    path = version_dir / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def signature_mismatch(version_dir: Path) -> None:
    """metadata.json names a user feature that the user tower's signature does not take."""
    _edit_metadata(version_dir,
                   lambda m: m["model"]["user_features"]["categorical"].append("shoe_size"))


def corrupt_variables(version_dir: Path) -> None:
    (data,) = (version_dir / "variables").glob("variables.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def wrong_dimension(version_dir: Path) -> None:
    _edit_metadata(version_dir, lambda m: m["model"].update(
        embedding_dim=m["model"]["embedding_dim"] // 2))


def half_copied(version_dir: Path) -> None:
    """What a copier that is not atomic leaves mid-way: the graph and metadata, no variables
    and no assets yet."""
    shutil.rmtree(version_dir / "variables")
    shutil.rmtree(version_dir / "assets")


def empty_catalog(version_dir: Path) -> None:
    path = version_dir / "assets" / "items.parquet"
    pd.read_parquet(path).iloc[0:0].to_parquet(path, index=False)


def rewrite_items(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def breakage(version_dir: Path) -> None:
        path = version_dir / "assets" / "items.parquet"
        change(pd.read_parquet(path)).to_parquet(path, index=False)

    return breakage


def duplicate_user_id(version_dir: Path) -> None:
    path = version_dir / "assets" / "users.parquet"
    users = pd.read_parquet(path)
    users["user_id"] = users["user_id"].astype(object)
    users.loc[len(users) - 1, "user_id"] = users.loc[0, "user_id"]
    users.to_parquet(path, index=False)


def _duplicate_id(items: pd.DataFrame) -> pd.DataFrame:
    items["item_id"] = items["item_id"].astype(object)
    items.loc[len(items) - 1, "item_id"] = items.loc[0, "item_id"]
    return items


def _missing_id(items: pd.DataFrame) -> pd.DataFrame:
    items["item_id"] = items["item_id"].astype(object)
    items.loc[3, "item_id"] = None
    return items


@pytest.fixture(scope="module")
def without_score_signature(tmp_path_factory: pytest.TempPathFactory,
                            model_store: Path) -> Path:
    """Version 1's SavedModel saved again with only the two towers: no `score` signature."""
    import tensorflow as tf

    target = tmp_path_factory.mktemp("no_score") / "saved"
    loaded = tf.saved_model.load(str(model_store / MODEL / "1"))
    signatures = {name: fn for name, fn in loaded.signatures.items() if name != "score"}
    tf.saved_model.save(loaded, str(target), signatures=signatures)
    return target


def missing_signature(source: Path) -> Callable[[Path], None]:
    def change(version_dir: Path) -> None:
        (version_dir / "saved_model.pb").write_bytes((source / "saved_model.pb").read_bytes())
        shutil.rmtree(version_dir / "variables")
        shutil.copytree(source / "variables", version_dir / "variables")

    return change


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "signature_mismatch": signature_mismatch,
    "corrupt_variables": corrupt_variables,
    "wrong_dimension": wrong_dimension,
    "half_copied": half_copied,
    "empty_catalog": empty_catalog,
    "duplicate_item_id": rewrite_items(_duplicate_id),
    "missing_item_id": rewrite_items(_missing_id),
    "missing_item_column": rewrite_items(lambda items: items.drop(columns=["category"])),
    "duplicate_user_id": duplicate_user_id,
}
# What each refusal must say (in the log line and the reload answer).
REASONS = {
    "signature_mismatch": "signature 'user_tower' takes",
    "corrupt_variables": "SavedModel does not load",
    "wrong_dimension": "gives dimension",
    "half_copied": "incomplete version directory",
    "empty_catalog": "item table is empty",
    "duplicate_item_id": "appears more than once",
    "missing_item_id": "1 item ids are missing",
    "missing_item_column": "asset tables lack columns ['category']",
    "duplicate_user_id": "user id '",
    "missing_signature": "signature 'score' is missing",
}


def refusal_records(caplog: pytest.LogCaptureFixture, number: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == MANAGER_LOG and r.levelno >= logging.ERROR
            and f"version {number} at " in r.getMessage()]


# ---- one serving app, broken versions published above it ---------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, model_store: Path,
            redis_url: str) -> Iterator[tuple[TestClient, Path]]:
    """An app polling every 0.5 s on its own store copy; tests publish broken versions above
    whatever it serves."""
    store = tmp_path_factory.mktemp("broken") / "store"
    shutil.copytree(model_store, store)
    with started_client(make_settings(store, redis_url, poll_interval_s=0.5)) as client:
        yield client, store / MODEL


def assert_still_serving(client: TestClient, version: int) -> None:
    assert ok_json(client.post("/v1/score", json=SCORE_BODY))["model"]["version"] == version
    body = ok_json(client.post("/v1/recommend", json={"user": {"id": "u1"}, "k": 3}))
    assert body["model"]["version"] == version and len(body["items"]) == 3
    ready = ok_json(client.get("/readyz"))
    assert ready["status"] == "ready" and ready["checks"]["model"]["version"] == version
    assert ok_json(client.get("/healthz")) == {"status": "ok"}


@pytest.mark.parametrize("breakage", [*BREAKAGES, "missing_signature"])
def test_broken_version_is_refused_on_reload(serving: tuple[TestClient, Path], breakage: str,
                                             without_score_signature: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    client, model_dir = serving
    served = ok_json(client.get("/v1/model"))["version"]
    before = read_metric(client, REFUSALS)
    number = next_version(model_dir)
    change = BREAKAGES.get(breakage) or missing_signature(without_score_signature)
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOG):
        publish_version(model_dir, number, change=change)
        # The poller may see it first; either way it is refused once and reload reports it.
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert f"version {number}: " in message and REASONS[breakage] in message, message
        assert f"serving version {served}" in message
        wait_for(lambda: read_metric(client, REFUSALS) == before + 1, 10,
                 f"{REFUSALS} counting version {number}")
    (record,) = refusal_records(caplog, number)
    assert REASONS[breakage] in record.getMessage()
    assert_still_serving(client, served)
    assert read_metric(client, REFUSALS) == before + 1


def test_polling_refuses_a_broken_version_once(serving: tuple[TestClient, Path],
                                               caplog: pytest.LogCaptureFixture) -> None:
    client, model_dir = serving
    served = ok_json(client.get("/v1/model"))["version"]
    before = read_metric(client, REFUSALS)
    number = next_version(model_dir)
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOG):
        publish_version(model_dir, number, change=corrupt_variables)
        wait_for(lambda: read_metric(client, REFUSALS) == before + 1, 10,
                 f"the poller refusing version {number}")
        time.sleep(1.5)  # three more polls: a refused version is not retried until it changes
    assert read_metric(client, REFUSALS) == before + 1
    assert len(refusal_records(caplog, number)) == 1, caplog.text
    assert_still_serving(client, served)


def test_valid_version_above_broken_ones_is_served(serving: tuple[TestClient, Path]) -> None:
    client, model_dir = serving
    broken = next_version(model_dir)
    publish_version(model_dir, broken, change=corrupt_variables)
    publish_version(model_dir, broken + 1)
    wait_for(lambda: ok_json(client.get("/v1/model"))["version"] == broken + 1, 30,
             f"the poller switching to version {broken + 1}")
    assert_still_serving(client, broken + 1)


# ---- stores with broken versions at start ------------------------------------------------------


def test_only_broken_versions_is_not_ready_but_alive(tmp_path: Path, model_store: Path,
                                                     redis_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    model_dir = tmp_path / "store" / MODEL
    model_dir.mkdir(parents=True)
    source = model_store / MODEL / "1"
    publish_version(model_dir, 1, source=source, change=corrupt_variables)
    publish_version(model_dir, 2, source=source, change=empty_catalog)
    settings = make_settings(tmp_path / "store", redis_url)
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOG), \
            started_client(settings, wait=False) as client:
        def both_refused() -> tuple[int, dict] | None:  # type: ignore[type-arg]
            response = client.get("/readyz")
            body = response.json()
            error = str(body["checks"]["model"].get("error"))
            return (response.status_code, body) \
                if "version 1" in error and "version 2" in error else None

        status, body = wait_for(both_refused, 60, "readiness naming both refused versions")
        assert status == 503, body
        assert body["status"] == "not_ready" and body["failed"] == "model", body
        assert body["checks"]["model"]["ok"] is False
        assert ok_json(client.get("/healthz")) == {"status": "ok"}  # liveness: no model needed
        assert_error(client.post("/v1/score", json=SCORE_BODY), 503, "not_ready")
        assert read_metric(client, REFUSALS) == 2
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert "version 1" in message and "version 2" in message
        # Until a version loads the service looks every second; refused ones are not redone.
        time.sleep(2.5)
        assert read_metric(client, REFUSALS) == 2
        assert len(refusal_records(caplog, 1)) == 1 and len(refusal_records(caplog, 2)) == 1

        # A valid version published later is served without a restart or a reload.
        publish_version(model_dir, 3, source=source)
        ready = wait_ready(client, 30)
        assert ready["checks"]["model"]["version"] == 3
        assert_still_serving(client, 3)


def test_broken_newest_versions_at_start_serve_the_older(store: Path, redis_url: str,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    model_dir = store / MODEL
    publish_version(model_dir, 2, change=corrupt_variables)
    publish_version(model_dir, 3, change=half_copied)
    with caplog.at_level(logging.ERROR, logger=MANAGER_LOG), \
            started_client(make_settings(store, redis_url)) as client:
        assert_still_serving(client, 1)
        assert ok_json(client.get("/v1/model"))["version"] == 1
        assert read_metric(client, REFUSALS) == 2
        message = assert_error(client.post("/v1/admin/reload"), 409, "version_refused")
        assert "version 2" in message and "version 3" in message
        assert "serving version 1" in message
    assert len(refusal_records(caplog, 2)) == 1 and len(refusal_records(caplog, 3)) == 1
