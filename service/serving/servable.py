"""A model version ready to serve: signatures, the item matrix, and the indexes requests use.

Immutable once built (but for a memo of stored users' embeddings); the manager swaps whole
instances, so a request that took a reference runs entirely on one version.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow as tf
from numpy.typing import NDArray

from service.data.dataset import ITEM_ID, USER_ID
from service.model_format import HISTORY_COLUMN, ITEM_EMBEDDING, SCORE, USER_EMBEDDING
from service.ranking import rank
from service.serving.errors import InvalidFeature, UnknownFeature, UnknownFilter
from service.serving.inputs import UserQuery, as_list, item_inputs, user_inputs
from service.serving.loader import ModelVersion

# Stored users whose embeddings are kept (64 floats each: 1M users = 256 MB at most).
USER_CACHE_SIZE = 1_000_000
# Far beyond any real feature, and safely inside float32 after standardisation.
MAX_ABS_NUMERIC = 1e30


def ids_digest(item_ids: Sequence[str]) -> str:
    """Identifies the catalog order: a cached matrix is only valid for the same row order."""
    digest = hashlib.sha256()
    for item_id in item_ids:
        digest.update(item_id.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def compute_item_matrix(version: ModelVersion, batch_size: int) -> NDArray[np.float32]:
    """Runs the item tower over the whole catalog in batches, straight into one array."""
    matrix: NDArray[np.float32] | None = None
    for start in range(0, len(version.items), batch_size):
        chunk = version.items.iloc[start:start + batch_size]
        out = version.item_tower(**item_inputs(version.spec.item_features, chunk))
        block = out[ITEM_EMBEDDING].numpy()
        if matrix is None:
            matrix = np.empty((len(version.items), block.shape[1]), dtype=np.float32)
        matrix[start:start + len(block)] = block
    assert matrix is not None, "an empty catalog is refused when the version loads"
    return matrix


@dataclass(frozen=True)
class StoredUser:
    features: dict[str, Any]
    history: tuple[str, ...]


def attribute_index(version: ModelVersion) -> dict[str, dict[str, NDArray[np.int32]]]:
    """attribute -> value -> item rows, for every categorical and multi-valued item feature.

    Computed in Arrow (flatten, dictionary-encode, sort the codes), so a million items with
    their genre lists never become Python objects."""
    spec = version.spec.item_features
    return {name: rows_by_value(as_arrow(version.items[name]))
            for name in spec.categorical + spec.multi}


def as_arrow(column: pd.Series) -> pa.Array:
    array = pa.array(column, from_pandas=True)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def rows_by_value(column: pa.Array) -> dict[str, NDArray[np.int32]]:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values, rows = pc.list_flatten(column), pc.list_parent_indices(column)
    else:
        values, rows = column, pa.array(np.arange(len(column)))
    encoded = pc.dictionary_encode(pc.cast(values, pa.string()))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(encoded.indices.is_null().to_numpy(zero_copy_only=False))
    codes, item_rows = codes[valid].astype(np.int64), rows.to_numpy()[valid].astype(np.int32)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {str(value): item_rows[order[start:end]]
            for value, start, end in zip(encoded.dictionary.to_pylist(), bounds[:-1],
                                         bounds[1:], strict=True) if end > start}


def stored_users(version: ModelVersion) -> dict[str, StoredUser]:
    names = list(version.spec.user_features.names)
    table = version.users
    features = table[names].to_dict("records") if names else [{}] * len(table)
    return {str(uid): StoredUser({str(k): v for k, v in f.items() if not _missing(v)},
                                 tuple(str(i) for i in as_list(h)))
            for uid, f, h in zip(table[USER_ID], features, table[HISTORY_COLUMN], strict=True)}


def finite_number(name: str, value: Any) -> float:
    """A request's numeric feature as a float the model can take (float32, finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFeature(f"feature {name!r} must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_ABS_NUMERIC:
        raise InvalidFeature(f"feature {name!r} must be a finite number of magnitude at most "
                             f"{MAX_ABS_NUMERIC:g}")
    return number


Recommendation = list[tuple[str, float]]


@dataclass(frozen=True)
class RecommendCall:
    """One /v1/recommend, validated: the user, k and the catalog rows it may get."""

    query: UserQuery
    k: int
    allowed: NDArray[np.bool_] | None = None  # None: every item

    def depth(self, model: ServingModel) -> int:
        return max(model.rerank_depth, self.k)


@dataclass(frozen=True)
class ScoreCall:
    """One /v1/score, validated: the user and the catalog rows to score, in order."""

    query: UserQuery
    rows: tuple[int, ...]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class ServingModel:
    def __init__(self, version: ModelVersion, item_matrix: NDArray[np.float32], source: str,
                 rerank_depth: int) -> None:
        self.version = version
        self.spec = version.spec
        self.item_matrix = item_matrix
        self.source = source
        self.rerank_depth = rerank_depth
        self.item_ids: NDArray[Any] = version.items[ITEM_ID].to_numpy(dtype=object)
        # A pandas hash index, not a dict: about a third of the memory at a million ids.
        self.item_index = pd.Index(self.item_ids)
        self.attributes = attribute_index(version)
        self.users = stored_users(version)
        self.embeddings: dict[str, NDArray[np.float32]] = {}
        # The feature columns were needed for the item matrix and the indexes only; at 1M
        # items their Python objects (genre lists) weigh about 200 MB.
        version.items = version.items[[ITEM_ID]]

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def number(self) -> int:
        return self.version.version

    # -- users ------------------------------------------------------------------------------

    def query(self, user_id: str | None, features: Mapping[str, Any] | None) -> UserQuery:
        """The user as the tower sees them: stored features and history, request overrides."""
        stored = self.users.get(user_id) if user_id is not None else None
        merged = dict(stored.features) if stored else {}
        overrides = self.validated_features(features or {})
        merged.update(overrides)
        return UserQuery(user_id or "", merged, stored.history if stored else (),
                         stored=stored is not None and not overrides)

    def validated_features(self, features: Mapping[str, Any]) -> dict[str, Any]:
        spec = self.spec.user_features
        unknown = sorted(set(features) - set(spec.names))
        if unknown:
            raise UnknownFeature(f"unknown user feature(s) {unknown}; this model takes "
                                 f"{sorted(spec.names)}")
        out: dict[str, Any] = {}
        for name, value in features.items():
            if value is None:
                continue
            if name in spec.numeric:
                value = finite_number(name, value)
            elif name in spec.multi:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise InvalidFeature(f"feature {name!r} must be a list of strings")
            elif not isinstance(value, str | int) or isinstance(value, bool):
                raise InvalidFeature(f"feature {name!r} must be a string")
            out[name] = value if name in spec.numeric or name in spec.multi else str(value)
        return out

    def embed(self, queries: Sequence[UserQuery]) -> NDArray[np.float32]:
        """User embeddings; stored users come from a per-version cache after their first
        request (the user tower is a third of a lone request's time)."""
        cached = [self.embeddings.get(q.user_id) if q.stored else None for q in queries]
        missing = [n for n, e in enumerate(cached) if e is None]
        if missing:
            inputs = user_inputs(self.spec.user_features, self.spec.history_length,
                                 [queries[n] for n in missing])
            computed = np.asarray(self.version.user_tower(**inputs)[USER_EMBEDDING],
                                  dtype=np.float32)
            for n, embedding in zip(missing, computed, strict=True):
                cached[n] = embedding
                if queries[n].stored and len(self.embeddings) < USER_CACHE_SIZE:
                    self.embeddings[queries[n].user_id] = embedding.copy()
        return np.stack([e for e in cached if e is not None])

    # -- scoring ----------------------------------------------------------------------------

    def head(self, users: NDArray[np.float32], items: NDArray[np.float32]) -> NDArray[np.float32]:
        out = self.version.score(user_embedding=tf.constant(users),
                                 item_embedding=tf.constant(items))
        return np.asarray(out[SCORE], dtype=np.float32)

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[str], tuple[int, ...], list[str]]:
        """The known ids and their catalog rows (in the order asked), and the unknown ids."""
        rows = self.rows_of(item_ids)
        return ([i for i, r in zip(item_ids, rows, strict=True) if r >= 0],
                tuple(int(r) for r in rows if r >= 0),
                [i for i, r in zip(item_ids, rows, strict=True) if r < 0])

    def rows_of(self, item_ids: Sequence[str]) -> NDArray[np.intp]:
        """Catalog row of each id, -1 for an unknown one."""
        if not item_ids:
            return np.zeros(0, dtype=np.intp)
        return self.item_index.get_indexer(pd.Index(np.asarray(item_ids, dtype=object)))

    def score_many(self, calls: Sequence[ScoreCall]) -> list[list[float]]:
        """Head scores per call: one user-tower call for all of them."""
        users = self.embed([c.query for c in calls])
        return [self.head(users[i:i + 1], self.item_matrix[list(c.rows)][None])[0].tolist()
                if c.rows else [] for i, c in enumerate(calls)]

    def allowed(self, query: UserQuery, exclude_ids: Sequence[str], exclude_seen: bool,
                filters: Mapping[str, Sequence[str]]) -> NDArray[np.bool_] | None:
        """Which catalog rows may be recommended (None: all of them)."""
        if not filters and not exclude_ids and not (exclude_seen and query.history):
            return None
        mask = np.ones(len(self.item_ids), dtype=bool)
        for attribute, values in filters.items():
            index = self.attributes.get(attribute)
            if index is None:
                raise UnknownFilter(f"unknown filter attribute {attribute!r}; items have "
                                    f"{sorted(self.attributes)}")
            keep = np.zeros_like(mask)
            for value in values:
                keep[index.get(value, [])] = True
            mask &= keep
        excluded = list(exclude_ids) + (list(query.history) if exclude_seen else [])
        rows = self.rows_of(excluded)
        mask[rows[rows >= 0]] = False
        return mask

    def recommend_many(self, calls: Sequence[RecommendCall]) -> list[Recommendation]:
        """Top-k per call, computed together: one user-tower call, one matrix product, one head
        call. Every call must share one retrieval depth, so each result is what the call
        alone would get."""
        depth = calls[0].depth(self)
        assert all(c.depth(self) == depth for c in calls), "batch mixes retrieval depths"
        users = self.embed([c.query for c in calls])
        allowed = None
        if any(c.allowed is not None for c in calls):
            allowed = np.ones((len(calls), len(self.item_ids)), dtype=bool)
            for row, call in enumerate(calls):
                if call.allowed is not None:
                    allowed[row] = call.allowed
        indices, scores = rank(users, self.item_matrix, max(c.k for c in calls), self.head,
                               self.spec.retrieval, depth, allowed)
        return [[(str(self.item_ids[i]), float(s))
                 for i, s in zip(indices[row, :call.k], scores[row, :call.k], strict=True)
                 if i >= 0] for row, call in enumerate(calls)]
