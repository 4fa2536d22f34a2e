"""Vocabularies, numeric statistics and the integer encodings the model trains on.

Index 0 of every vocabulary means "unknown": padding, a missing value, an out-of-vocabulary
token. The exporter builds the same mapping into the SavedModel (string in, index out), so the
two sides agree by construction; a test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID, FeatureSpec
from service.model_format import time_buckets
from service.training.split import sort_by_time

NUMERIC_CLIP = 8.0
MAX_MULTI_VALUES = 32
NUMERIC_BUCKETS = 10
BUCKET_SUFFIX = "#bucket"


@dataclass(frozen=True)
class Vocabulary:
    """Tokens in index order starting at 1; 0 is the unknown bucket."""

    tokens: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.tokens) + 1

    def encode(self, values: Any) -> NDArray[np.int32]:
        positions = pd.Index(self.tokens).get_indexer(pd.Index(np.asarray(values, dtype=object)))
        return (positions + 1).astype(np.int32)


def fit_vocabulary(values: pd.Series) -> Vocabulary:
    """Tokens sorted by frequency (then lexically) so indices are deterministic; "" excluded."""
    counts = values[values != ""].astype(str).value_counts()
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Vocabulary(tuple(str(token) for token, _ in ordered))


@dataclass(frozen=True)
class NumericStats:
    """Standardisation plus quantile buckets: the bucket embedding lets the model learn
    thresholds (age groups, price bands) that a single scaled value makes hard."""

    mean: float
    std: float
    boundaries: tuple[float, ...] = ()

    def normalise(self, values: Any) -> NDArray[np.float32]:
        x = (np.asarray(values, dtype=np.float32) - np.float32(self.mean)) / np.float32(self.std)
        x = np.where(np.isfinite(x), x, np.float32(0.0))
        return np.clip(x, -NUMERIC_CLIP, NUMERIC_CLIP).astype(np.float32)

    def bucketise(self, values: Any) -> NDArray[np.int32]:
        """1 + the number of boundaries <= value; 0 for a missing (non-finite) value."""
        x = np.asarray(values, dtype=np.float32)
        buckets = np.searchsorted(np.asarray(self.boundaries, dtype=np.float32), x,
                                  side="right") + 1
        return np.where(np.isfinite(x), buckets, 0).astype(np.int32)

    @property
    def n_buckets(self) -> int:
        return len(self.boundaries) + 2


def fit_numeric(values: pd.Series) -> NumericStats:
    finite = pd.to_numeric(values, errors="coerce").astype(float)
    finite = finite[np.isfinite(finite)]
    if finite.empty:
        return NumericStats(0.0, 1.0)
    std = float(finite.std(ddof=0))
    quantiles = np.quantile(finite, np.linspace(0, 1, NUMERIC_BUCKETS + 1)[1:-1])
    return NumericStats(float(finite.mean()), std if std > 1e-6 else 1.0,
                        tuple(float(q) for q in np.unique(quantiles.astype(np.float32))))


@dataclass
class TableSchema:
    """Vocabularies and statistics of one table's side features."""

    spec: FeatureSpec
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    numeric: dict[str, NumericStats] = field(default_factory=dict)

    def encode(self, table: pd.DataFrame) -> dict[str, NDArray[Any]]:
        """Integer / float arrays per feature, one row per table row."""
        encoded: dict[str, NDArray[Any]] = {}
        for name in self.spec.categorical:
            encoded[name] = self.vocabularies[name].encode(table[name].astype(str))
        for name in self.spec.multi:
            encoded[name] = encode_lists(table[name], self.vocabularies[name])
        for name in self.spec.numeric:
            values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float32)
            encoded[name] = self.numeric[name].normalise(values)
            encoded[name + BUCKET_SUFFIX] = self.numeric[name].bucketise(values)
        return encoded


def encode_lists(values: pd.Series, vocabulary: Vocabulary) -> NDArray[np.int32]:
    """Multi-valued cells (lists of strings) as a right-padded index matrix."""
    lists = [list(v)[:MAX_MULTI_VALUES] if isinstance(v, list | tuple | np.ndarray) else []
             for v in values]
    width = max(1, max((len(v) for v in lists), default=1))
    flat = [token for v in lists for token in v]
    codes = vocabulary.encode(flat) if flat else np.zeros(0, dtype=np.int32)
    out = np.zeros((len(lists), width), dtype=np.int32)
    lengths = np.array([len(v) for v in lists], dtype=np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = codes
    return out


def fit_table_schema(table: pd.DataFrame, spec: FeatureSpec) -> TableSchema:
    schema = TableSchema(spec)
    for name in spec.categorical:
        schema.vocabularies[name] = fit_vocabulary(table[name].astype(str))
    for name in spec.multi:
        exploded = table[name].explode().dropna()
        schema.vocabularies[name] = fit_vocabulary(exploded.astype(str))
    for name in spec.numeric:
        schema.numeric[name] = fit_numeric(table[name])
    return schema


POPULARITY = "popularity"


def with_popularity(items: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Adds the item's log count of training rows: how much it is seen (with explicit
    negatives: its exposure, not its clicks, which the model should explain itself)."""
    counts = train[ITEM_ID].value_counts()
    items = items.copy()
    items[POPULARITY] = np.log1p(items[ITEM_ID].map(counts).fillna(0).to_numpy(dtype=np.float64))
    return items


@dataclass
class FeatureSchema:
    """Everything needed to turn raw tables into model inputs, fitted on the training part.

    time_boundaries: where the query time's buckets split (Unix seconds, quantiles of the
    training rows' times); None when the model takes no query time."""

    user_ids: Vocabulary
    item_ids: Vocabulary
    users: TableSchema
    items: TableSchema
    history_length: int
    time_boundaries: tuple[float, ...] | None = None


def fit_feature_schema(train: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                       user_spec: FeatureSpec, item_spec: FeatureSpec,
                       history_length: int, time_bucket_count: int = 0) -> FeatureSchema:
    positives = train[train[LABEL] > 0]
    return FeatureSchema(
        user_ids=fit_vocabulary(train[USER_ID]),
        item_ids=fit_vocabulary(positives[ITEM_ID]),
        users=fit_table_schema(users[users[USER_ID].isin(train[USER_ID])], user_spec),
        items=fit_table_schema(items, item_spec),
        history_length=history_length,
        time_boundaries=fit_time_boundaries(train[TIMESTAMP], time_bucket_count),
    )


def fit_time_boundaries(times: pd.Series, buckets: int) -> tuple[float, ...] | None:
    """``buckets`` - 1 quantiles of the training rows' times (fewer where times repeat);
    None for no buckets, or when every row has the same time."""
    if buckets < 2 or times.nunique() < 2:
        return None
    quantiles = np.quantile(times.to_numpy(dtype=np.float64), np.linspace(0, 1, buckets + 1)[1:-1])
    return tuple(float(q) for q in np.unique(quantiles))


@dataclass
class PositiveSequences:
    """Each user's positive items (item-vocabulary indices) in time order, concatenated."""

    items: NDArray[np.int32]
    start: dict[str, int]
    length: dict[str, int]

    def history(self, user_id: str, length: int) -> NDArray[np.int32]:
        """The last ``length`` positives of a user, left-padded with 0."""
        out = np.zeros(length, dtype=np.int32)
        begin, count = self.start.get(user_id, 0), self.length.get(user_id, 0)
        take = min(count, length)
        if take:
            out[length - take:] = self.items[begin + count - take: begin + count]
        return out


def positive_sequences(interactions: pd.DataFrame, item_ids: Vocabulary) -> PositiveSequences:
    ordered = sort_by_time(interactions[interactions[LABEL] > 0])
    codes = item_ids.encode(ordered[ITEM_ID])
    users = ordered[USER_ID].to_numpy()
    sizes = pd.Series(users).value_counts(sort=False)
    first = pd.Series(np.arange(len(users))).groupby(users).min()
    return PositiveSequences(codes, {str(u): int(i) for u, i in first.items()},
                             {str(u): int(n) for u, n in sizes.items()})




@dataclass
class TrainingExamples:
    """Interaction rows as arrays, with the causal history of each row (positives before it)."""

    user_row: NDArray[np.int64]
    user_index: NDArray[np.int32]
    item_row: NDArray[np.int64]
    label: NDArray[np.float32]
    history: NDArray[np.int32]
    time_bucket: NDArray[np.int32]  # the row's time as the query time (zeros without one)


def training_examples(interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                      schema: FeatureSchema) -> TrainingExamples:
    """One example per row; history = the user's earlier positives, at most history_length."""
    ordered = sort_by_time(interactions).reset_index(drop=True)
    user_codes = ordered[USER_ID].to_numpy()
    labels = ordered[LABEL].to_numpy(dtype=np.float32)
    is_positive = labels > 0
    # All users' positives in (user, time) order; a row's history ends just before the
    # positives counted so far and starts no earlier than its user's first positive.
    positive_items = schema.item_ids.encode(ordered.loc[is_positive, ITEM_ID])
    end: NDArray[np.int64] = np.cumsum(is_positive) - is_positive
    first = pd.Series(end).groupby(user_codes).transform("min").to_numpy()
    index = end[:, None] + np.arange(-schema.history_length, 0)[None, :]
    valid = index >= first[:, None]
    padded = np.concatenate([positive_items, np.zeros(1, dtype=np.int32)])
    history = np.where(valid, padded[np.where(valid, index, -1)], 0).astype(np.int32)
    user_rows = pd.Index(users[USER_ID]).get_indexer(pd.Index(user_codes))
    item_rows = pd.Index(items[ITEM_ID]).get_indexer(pd.Index(ordered[ITEM_ID]))
    buckets = (time_buckets(ordered[TIMESTAMP], schema.time_boundaries)
               if schema.time_boundaries is not None else np.zeros(len(ordered), np.int32))
    return TrainingExamples(user_rows.astype(np.int64), schema.user_ids.encode(user_codes),
                            item_rows.astype(np.int64), labels, history, buckets)
