"""Shared serving fixtures: the trained version's tables and one started app per module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from .helpers import make_settings, started_client

# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def version_dir(model_store: Path) -> Path:
    return model_store / "default" / "1"


@pytest.fixture(scope="session")
def items_table(version_dir: Path) -> pd.DataFrame:
    items = pd.read_parquet(version_dir / "assets" / "items.parquet")
    items["item_id"] = items["item_id"].astype(str)
    return items


@pytest.fixture(scope="session")
def users_table(version_dir: Path) -> pd.DataFrame:
    users = pd.read_parquet(version_dir / "assets" / "users.parquet")
    users["user_id"] = users["user_id"].astype(str)
    return users


@pytest.fixture(scope="session")
def metadata(version_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((version_dir / "metadata.json").read_text())
    return doc


@pytest.fixture(scope="module")
def client(model_store: Path, redis_url: str) -> Iterator[TestClient]:
    """One started app on the trained store (default settings), shared by a module's tests."""
    with started_client(make_settings(model_store, redis_url)) as started:
        yield started
