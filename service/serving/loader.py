"""Finds, validates and loads model versions; a broken version never reaches the service."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    QUERY_TIME,
    SCORE,
    TIME_EMBEDDING,
    USER_EMBEDDING,
    USER_TOWER,
    USERS_FILE,
    ModelSpec,
    content_fingerprint,
    input_name,
)
from service.serving.attributes import AttributeIndex, attribute_index
from service.serving.errors import ModelLoadError
from service.serving.id_index import IdIndex
from service.serving.inputs import UserQuery, item_inputs, user_inputs
from service.serving.users import StoredUsers, read_users

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
    item_index: IdIndex
    item_attributes: AttributeIndex
    users: StoredUsers
    user_tower: Any
    item_tower: Any
    score: Any
    saved_model: Any  # keeps the loaded object (and its variables) alive
    query_time: Any = None  # the signature, when the model takes a query time


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
    expected = {
        USER_TOWER: {"user_id", "history"} | {input_name(n) for n in spec.user_features.names},
        ITEM_TOWER: {"item_id"} | {input_name(n) for n in spec.item_features.names},
        SCORE: {USER_EMBEDDING, ITEM_EMBEDDING}}
    if spec.time_boundaries is not None:
        expected[QUERY_TIME] = {QUERY_TIME}
    return expected


def check_signatures(saved_model: Any, spec: ModelSpec) -> None:
    for name, inputs in expected_inputs(spec).items():
        if name not in saved_model.signatures:
            raise ModelLoadError(f"signature {name!r} is missing")
        found = set(saved_model.signatures[name].structured_input_signature[1])
        if found != inputs:
            raise ModelLoadError(f"signature {name!r} takes {sorted(found)}, metadata says "
                                 f"{sorted(inputs)}")


def read_tables(path: Path, spec: ModelSpec) -> tuple[IdIndex, AttributeIndex, StoredUsers]:
    """The catalog's ids and filter attributes (the items' other features are read in batches
    when the item matrix is computed), and the stored users, their histories linked to the
    catalog's rows."""
    items_file, users_file = path / ASSETS_DIR / ITEMS_FILE, path / ASSETS_DIR / USERS_FILE
    features = spec.item_features
    user_features = list(spec.user_features.names)
    try:
        missing = ({ITEM_ID, *features.names} - set(pq.read_schema(items_file).names)) | \
                  ({USER_ID, HISTORY_COLUMN, *user_features} -
                   set(pq.read_schema(users_file).names))
        if missing:
            raise ModelLoadError(f"asset tables lack columns {sorted(missing)}")
        # ParquetFile, not pq.read_table: that goes through pyarrow.dataset, which imports
        # pandas, about 50 MB of each server process that nothing else needs.
        with pq.ParquetFile(items_file) as table_file:
            items = table_file.read(columns=[ITEM_ID, *features.categorical, *features.multi])
    except ModelLoadError:
        raise
    except Exception as exc:  # pyarrow raises many kinds for a damaged file
        raise ModelLoadError(f"unreadable asset table: {exc}") from exc
    if items.num_rows == 0:
        raise ModelLoadError("the item table is empty: nothing to recommend")
    try:
        item_index = IdIndex(items.column(ITEM_ID))
        attributes = attribute_index(items, features.categorical + features.multi)
    except (ValueError, pa.ArrowException) as exc:
        raise ModelLoadError(f"the item table is unusable: {exc}") from exc
    del items
    try:
        users = read_users(users_file, user_features, item_index)
    except Exception as exc:  # a damaged file, or a table the users cannot be read from
        raise ModelLoadError(f"unreadable asset table: {exc}") from exc
    return item_index, attributes, users


def item_ids(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.cast(column, pa.large_string())


def item_batches(version: ModelVersion,
                 batch_size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """(first row, columns) of the item table with every feature, read batch by batch from the
    version's Parquet file: a million items' features never sit in memory beside their
    matrix. The ids must be the index's, in its order."""
    names = [ITEM_ID, *version.spec.item_features.names]
    start = 0
    try:
        batches = pq.ParquetFile(version.path / ASSETS_DIR / ITEMS_FILE).iter_batches(
            batch_size, columns=names)
        for batch in batches:
            ids = version.item_index.ids.slice(start, batch.num_rows)
            if not item_ids(batch.column(ITEM_ID)).equals(ids):
                raise ModelLoadError(f"the item table changed on disk (rows from {start})")
            columns = batch.to_pydict()
            columns[ITEM_ID] = ids.to_pylist()
            yield start, columns
            start += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise ModelLoadError(f"unreadable item table: {exc}") from exc
    if start != len(version.item_index):
        raise ModelLoadError(f"the item table changed on disk ({start} rows, "
                             f"{len(version.item_index)} indexed)")


def warm_up(version: ModelVersion) -> None:
    """One call through every signature: catches wrong shapes now, and pays TF's first-call
    cost before the version takes traffic."""
    spec = version.spec
    _, first = next(item_batches(version, 2))
    items = version.item_tower(**item_inputs(spec.item_features, first))
    item_matrix = items[ITEM_EMBEDDING].numpy()
    users = version.user_tower(**user_inputs(spec.user_features, spec.history_length,
                                             [UserQuery()]))[USER_EMBEDDING].numpy()
    if item_matrix.shape[1] != spec.embedding_dim and spec.retrieval == "dot":
        raise ModelLoadError(f"item tower gives dimension {item_matrix.shape[1]}, metadata "
                             f"says {spec.embedding_dim}")
    if version.query_time is not None:
        times = version.query_time(query_time=tf.constant([0.0], tf.float64))[TIME_EMBEDDING]
        if times.shape != users.shape:
            raise ModelLoadError(f"query_time signature gives {times.shape}, the user tower "
                                 f"{users.shape}")
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
    item_index, attributes, users = read_tables(path, spec)
    # Arrow keeps freed buffers in its pool (about 90 MB after a million items' columns).
    pa.default_memory_pool().release_unused()
    loaded = ModelVersion(name, version, path, fingerprint, metadata, spec, item_index,
                          attributes, users,
                          saved_model.signatures[USER_TOWER], saved_model.signatures[ITEM_TOWER],
                          saved_model.signatures[SCORE], saved_model,
                          saved_model.signatures.get(QUERY_TIME))
    try:
        warm_up(loaded)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"warm-up call failed: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from exc
    return loaded
