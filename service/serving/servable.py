"""A model version ready to serve: signatures, the item matrix, and the indexes requests use.

Immutable once built (but for its stored users' embeddings, each computed once); the manager
swaps whole instances, so a request that took a reference runs entirely on one version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from service.data.dataset import USER_ID
from service.model_format import HISTORY_COLUMN, ITEM_EMBEDDING, SCORE, USER_EMBEDDING
from service.ranking import Allowed, rank
from service.serving.ann import ApproximateIndex
from service.serving.errors import InvalidFeature, UnknownFeature, UnknownFilter
from service.serving.inputs import UserQuery, item_inputs, user_inputs
from service.serving.loader import ModelVersion, item_batches
from service.serving.quantized_scan import QuantizedScan
from service.serving.query_time import QueryTimeVectors
from service.serving.user_embeddings import UserEmbeddings
from service.serving.users import StoredUser

# Far beyond any real feature, and safely inside float32 after standardisation.
MAX_ABS_NUMERIC = 1e30


def compute_item_matrix(version: ModelVersion, batch_size: int) -> NDArray[np.float32]:
    """Runs the item tower over the whole catalog in batches, straight into one array."""
    matrix: NDArray[np.float32] | None = None
    for start, chunk in item_batches(version, batch_size):
        out = version.item_tower(**item_inputs(version.spec.item_features, chunk))
        block = out[ITEM_EMBEDDING].numpy()
        if matrix is None:
            matrix = np.empty((len(version.item_index), block.shape[1]), dtype=np.float32)
        matrix[start:start + len(block)] = block
    assert matrix is not None, "an empty catalog is refused when the version loads"
    return matrix


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
    allowed: Allowed | None = None  # None: every item

    def depth(self, model: ServingModel) -> int:
        return max(model.rerank_depth, self.k)


@dataclass(frozen=True)
class ScoreCall:
    """One /v1/score, validated: the user and the catalog rows to score, in order."""

    query: UserQuery
    rows: tuple[int, ...]


class ServingModel:
    def __init__(self, version: ModelVersion, item_matrix: NDArray[np.float32], source: str,
                 rerank_depth: int, approximate: ApproximateIndex | None = None,
                 scan: QuantizedScan | None = None) -> None:
        self.version = version
        self.spec = version.spec
        self.item_matrix = item_matrix
        self.source = source
        self.rerank_depth = rerank_depth
        self.approximate = approximate
        self.scan = scan
        self.item_index = version.item_index
        self.attributes = version.item_attributes
        self.users = version.users
        self.user_embeddings = UserEmbeddings(len(self.users), version.spec.embedding_dim)
        boundaries = version.spec.time_boundaries
        self.time_vectors = QueryTimeVectors(boundaries, version.query_time) \
            if boundaries is not None and version.query_time is not None else None

    def user_record(self, user_id: str, user: StoredUser) -> dict[str, Any]:
        """A stored user as published to Redis: id, history and every feature (None if
        missing)."""
        return {USER_ID: user_id, HISTORY_COLUMN: list(user.history),
                **{name: user.features.get(name) for name in self.spec.user_features.names}}

    @property
    def item_count(self) -> int:
        return len(self.item_index)

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def number(self) -> int:
        return self.version.version

    # -- users ------------------------------------------------------------------------------

    def query(self, user_id: str | None, features: Mapping[str, Any] | None,
              at: float | None = None) -> UserQuery:
        """The user as the tower sees them: stored features and history, request overrides,
        and the query time ``at`` (Unix seconds; None: now)."""
        stored = self.users.get(user_id) if user_id is not None else None
        merged = dict(stored.features) if stored else {}
        overrides = self.validated_features(features or {})
        merged.update(overrides)
        return UserQuery(user_id or "", merged, stored.history if stored else (),
                         stored_row=stored.row if stored is not None and not overrides else None,
                         seen_rows=stored.seen_rows if stored else None, time=at)

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
        """The u the head takes: the user tower's embedding (a stored user's computed once per
        version, see user_embeddings) plus the query time's vector, if the model has one."""
        users = self.tower_embeddings(queries)
        if self.time_vectors is not None:
            now = time.time()
            users += self.time_vectors([now if q.time is None else q.time for q in queries])
        return users

    def tower_embeddings(self, queries: Sequence[UserQuery]) -> NDArray[np.float32]:
        cached = [self.user_embeddings.get(q.stored_row) if q.stored_row is not None else None
                  for q in queries]
        missing = [n for n, e in enumerate(cached) if e is None]
        if missing:
            computed = self.user_tower([queries[n] for n in missing])
            stored = [(i, row) for i, n in enumerate(missing)
                      if (row := queries[n].stored_row) is not None]
            if stored:
                self.user_embeddings.put([row for _, row in stored],
                                         computed[[i for i, _ in stored]])
            for i, n in enumerate(missing):
                row = queries[n].stored_row
                # The kept value, should another thread have computed this user first.
                kept = self.user_embeddings.get(row) if row is not None else None
                cached[n] = computed[i] if kept is None else kept
        return np.stack([e for e in cached if e is not None])

    def user_tower(self, queries: Sequence[UserQuery]) -> NDArray[np.float32]:
        inputs = user_inputs(self.spec.user_features, self.spec.history_length, queries)
        return np.asarray(self.version.user_tower(**inputs)[USER_EMBEDDING], dtype=np.float32)

    def precompute_users(self, keep_going: Callable[[], bool] = lambda: True) -> int:
        """Every stored user's embedding not computed yet (see user_embeddings); stops early
        once ``keep_going()`` is false. Returns how many it computed."""
        queries = ((user.row, UserQuery(user_id, user.features, user.history,
                                        stored_row=user.row))
                   for user_id, user in self.users.items())
        return self.user_embeddings.fill(queries, self.user_tower, keep_going)

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
        return self.item_index.rows_of(item_ids)

    def score_many(self, calls: Sequence[ScoreCall]) -> list[list[float]]:
        """Head scores per call: one user-tower call for all of them."""
        users = self.embed([c.query for c in calls])
        return [self.head(users[i:i + 1], self.item_matrix[list(c.rows)][None])[0].tolist()
                if c.rows else [] for i, c in enumerate(calls)]

    def allowed(self, query: UserQuery, exclude_ids: Sequence[str], exclude_seen: bool,
                filters: Mapping[str, Sequence[str]]) -> Allowed | None:
        """Which catalog rows may be recommended (None: all of them)."""
        if not filters and not exclude_ids and not (exclude_seen and query.history):
            return None
        mask = None
        for attribute, values in filters.items():
            index = self.attributes.get(attribute)
            if index is None:
                raise UnknownFilter(f"unknown filter attribute {attribute!r}; items have "
                                    f"{sorted(self.attributes)}")
            keep = np.zeros(self.item_count, dtype=bool)
            for value in values:
                keep[index.get(value, [])] = True
            mask = keep if mask is None else mask & keep
        rows = [self.rows_of(exclude_ids)]
        if exclude_seen:
            rows.append(np.array(query.seen_rows, np.intp) if query.seen_rows is not None
                        else self.rows_of(query.history))
        excluded = np.concatenate(rows)
        return Allowed(mask, excluded[excluded >= 0])

    def recommend_many(self, calls: Sequence[RecommendCall]) -> list[Recommendation]:
        """Top-k per call, computed together: one user-tower call, one matrix product, one head
        call. Every call must share one retrieval depth, so each result is what the call
        alone would get."""
        depth = calls[0].depth(self)
        assert all(c.depth(self) == depth for c in calls), "batch mixes retrieval depths"
        users = self.embed([c.query for c in calls])
        indices, scores = rank(users, self.item_matrix, max(c.k for c in calls), self.head,
                               self.spec.retrieval, depth, [c.allowed for c in calls],
                               self.approximate.search if self.approximate else None,
                               self.scan)
        results = []
        for row, call in enumerate(calls):
            found = indices[row, :call.k] >= 0
            results.append(list(zip(self.item_index.ids_at(indices[row, :call.k][found]),
                                    scores[row, :call.k][found].tolist(), strict=True)))
        return results
