"""Finds, validates and loads model versions; a broken version never reaches the service."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from service.data.dataset import ITEM_ID, USER_ID
from service.model_format import (
    ASSETS_DIR,
    FORMAT_VERSION,
    HISTORY_COLUMN,
    ITEM_EMBEDDING,
    ITEM_TOWER,
    ITEMS_FILE,
    METADATA_FILE,
    SCORE,
    USER_EMBEDDING,
    USER_TOWER,
    USERS_FILE,
    ModelSpec,
    content_fingerprint,
    input_name,
)
from service.serving.errors import ModelLoadError
from service.serving.inputs import UserQuery, item_inputs, user_inputs

log = logging.getLogger(__name__)

REQUIRED_FILES = ("saved_model.pb", "variables/variables.index", METADATA_FILE,
                  f"{ASSETS_DIR}/{ITEMS_FILE}", f"{ASSETS_DIR}/{USERS_FILE}")


@dataclass
class ModelVersion:
    """A validated version: its signatures, tables and metadata."""

    name: str
    version: int
    path: Path
    fingerprint: str
    metadata: dict[str, Any]
    spec: ModelSpec
    items: pd.DataFrame
    users: pd.DataFrame
    user_tower: Any
    item_tower: Any
    score: Any
    saved_model: Any  # keeps the loaded object (and its variables) alive


def read_metadata(path: Path) -> tuple[dict[str, Any], ModelSpec]:
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(f"format_version {metadata.get('format_version')!r} is not "
                                 f"{FORMAT_VERSION}")
        return metadata, ModelSpec.from_dict(metadata["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"unreadable {METADATA_FILE}: {exc}") from exc


def expected_inputs(spec: ModelSpec) -> dict[str, set[str]]:
    return {USER_TOWER: {"user_id", "history"} | {input_name(n) for n in spec.user_features.names},
            ITEM_TOWER: {"item_id"} | {input_name(n) for n in spec.item_features.names},
            SCORE: {USER_EMBEDDING, ITEM_EMBEDDING}}


def check_signatures(saved_model: Any, spec: ModelSpec) -> None:
    for name, inputs in expected_inputs(spec).items():
        if name not in saved_model.signatures:
            raise ModelLoadError(f"signature {name!r} is missing")
        found = set(saved_model.signatures[name].structured_input_signature[1])
        if found != inputs:
            raise ModelLoadError(f"signature {name!r} takes {sorted(found)}, metadata says "
                                 f"{sorted(inputs)}")


def read_tables(path: Path, spec: ModelSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        # List columns (genres, tags) stay in Arrow: one Python list per item would cost
        # ~200 MB at a million items.
        items = pq.read_table(path / ASSETS_DIR / ITEMS_FILE).to_pandas(
            types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)
        users = pd.read_parquet(path / ASSETS_DIR / USERS_FILE)
    except Exception as exc:  # pyarrow raises many kinds for a damaged file
        raise ModelLoadError(f"unreadable asset table: {exc}") from exc
    missing = ({ITEM_ID, *spec.item_features.names} - set(items.columns)) | \
              ({USER_ID, HISTORY_COLUMN, *spec.user_features.names} - set(users.columns))
    if missing:
        raise ModelLoadError(f"asset tables lack columns {sorted(missing)}")
    if items.empty:
        raise ModelLoadError("the item table is empty: nothing to recommend")
    items[ITEM_ID] = items[ITEM_ID].astype(str)
    users[USER_ID] = users[USER_ID].astype(str)
    if not items[ITEM_ID].is_unique:
        raise ModelLoadError("the item table has duplicate item ids")
    return items.reset_index(drop=True), users


def warm_up(version: ModelVersion) -> None:
    """One call through every signature: catches wrong shapes now, and pays TF's first-call
    cost before the version takes traffic."""
    spec = version.spec
    items = version.item_tower(**item_inputs(spec.item_features, version.items.head(2)))
    item_matrix = items[ITEM_EMBEDDING].numpy()
    users = version.user_tower(**user_inputs(spec.user_features, spec.history_length,
                                             [UserQuery()]))[USER_EMBEDDING].numpy()
    if item_matrix.shape[1] != spec.embedding_dim and spec.retrieval == "dot":
        raise ModelLoadError(f"item tower gives dimension {item_matrix.shape[1]}, metadata "
                             f"says {spec.embedding_dim}")
    scores = version.score(user_embedding=tf.constant(users),
                           item_embedding=tf.constant(item_matrix[None]))[SCORE].numpy()
    if scores.shape != (1, len(item_matrix)) or not np.all(np.isfinite(scores)):
        raise ModelLoadError(f"score signature returned {scores.shape} / non-finite values")


def load_version(name: str, version: int, path: Path) -> ModelVersion:
    """Loads and checks one version directory; ModelLoadError says what is wrong."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"incomplete version directory: missing {', '.join(missing)}")
    metadata, spec = read_metadata(path)
    fingerprint = content_fingerprint(path)
    try:
        saved_model = tf.saved_model.load(str(path))
    except Exception as exc:  # TF raises a zoo of types for corrupt protobufs / variables
        raise ModelLoadError(f"SavedModel does not load: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from exc
    check_signatures(saved_model, spec)
    items, users = read_tables(path, spec)
    loaded = ModelVersion(name, version, path, fingerprint, metadata, spec, items, users,
                          saved_model.signatures[USER_TOWER], saved_model.signatures[ITEM_TOWER],
                          saved_model.signatures[SCORE], saved_model)
    try:
        warm_up(loaded)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"warm-up call failed: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from exc
    return loaded
