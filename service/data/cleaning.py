"""Normalise a loaded Dataset into the exact shape the trainer relies on, whatever the layout.

After `clean`:
- interactions: user_id, item_id (plain Python str, dtype object), timestamp (int64), label (int8)
  and true_probability (float64) when present; one row per (user, item), sorted by user id, time
  and item id. Rows without a user or item id are dropped.
- users: one row per user that has an interaction, sorted by id; features as below.
- items: every item of the item table plus every interacted item it lacked, sorted by id.
- features: categorical as str ("" when missing), numeric as float64 (NaN when missing), multi as
  a list of str (empty when missing).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from pandas.api.types import is_object_dtype, is_string_dtype

from service.data.dataset import (
    ITEM_ID,
    LABEL,
    TIMESTAMP,
    TRUE_PROBABILITY,
    USER_ID,
    Dataset,
    FeatureSpec,
)
from service.data.errors import DataError

logger = logging.getLogger(__name__)

# Combinations a non-negative int64 sort key can tell apart.
_INT64_KEYS = 2**63


@dataclass(frozen=True)
class CleaningReport:
    """What `clean` changed, for the log and for callers that want to show it."""

    interactions_in: int
    interactions_out: int
    dropped_missing_id: int
    dropped_missing_timestamp: int
    duplicates_collapsed: int
    duplicate_user_rows: int
    duplicate_item_rows: int
    users_without_interactions: int
    users_without_features: int
    items_without_features: int

    def summary(self) -> str:
        return (f"cleaning: {self.interactions_in} interactions in, {self.interactions_out} out "
                f"({self.dropped_missing_id} without a user or item id, "
                f"{self.dropped_missing_timestamp} without a timestamp, "
                f"{self.duplicates_collapsed} repeated (user, item) rows collapsed); "
                f"users: {self.users_without_interactions} without interactions dropped, "
                f"{self.users_without_features} without a feature row, "
                f"{self.duplicate_user_rows} repeated rows dropped; "
                f"items: {self.items_without_features} without a feature row, "
                f"{self.duplicate_item_rows} repeated rows dropped")


def clean(dataset: Dataset) -> Dataset:
    """The cleaned copy of `dataset` (see the module docstring); logs what was done at INFO."""
    cleaned, report = clean_with_report(dataset)
    logger.info("%s: %s", dataset.name, report.summary())
    return cleaned


def clean_with_report(dataset: Dataset) -> tuple[Dataset, CleaningReport]:
    """Like `clean`, also returning the report instead of only logging it."""
    result = _clean_interactions(dataset.interactions)
    interactions, counts = result.frame, result.counts
    if interactions.empty:
        raise DataError(f"{dataset.source}: no interaction has both a user id and an item id")
    users, user_counts = _clean_entities(
        dataset.users, USER_ID, dataset.user_features, result.user_ids,
        only_interacted=True, keep_display=False)
    items, item_counts = _clean_entities(
        dataset.items, ITEM_ID, dataset.item_features, result.item_ids,
        only_interacted=False, keep_display=True)
    report = CleaningReport(
        interactions_in=len(dataset.interactions), interactions_out=len(interactions),
        dropped_missing_id=counts["missing_id"], dropped_missing_timestamp=counts["missing_time"],
        duplicates_collapsed=counts["duplicates"], duplicate_user_rows=user_counts["duplicates"],
        duplicate_item_rows=item_counts["duplicates"],
        users_without_interactions=user_counts["unused"],
        users_without_features=user_counts["added"], items_without_features=item_counts["added"])
    cleaned = replace(dataset, interactions=interactions, users=users, items=items,
                      has_labels=bool((interactions[LABEL] == 0).any()))
    return cleaned, report


def factorize_ids(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids as (codes, sorted unique ids): ids are stripped str, code -1 marks a missing id.

    Only the distinct values are converted in Python, so 25M rows cost one hash pass; the
    result shares one str object per distinct id.
    """
    codes, raw = pd.factorize(values)
    texts = [_id_text(value) for value in raw]
    unique = sorted({text for text in texts if text is not None})
    position = {text: index for index, text in enumerate(unique)}
    # The extra trailing -1 is what code -1 (a missing raw value) indexes.
    remap = np.array([position[text] if text is not None else -1 for text in texts] + [-1],
                     dtype=np.int64)
    return remap[codes], np.array(unique, dtype=object)


def _id_text(value: object) -> str | None:
    """The canonical text of one id or category: 7.0 -> "7", " a " -> "a", "" -> None."""
    if isinstance(value, str):  # the common case first: this runs once per distinct value
        return value.strip() or None
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    return str(value).strip() or None


@dataclass(frozen=True)
class _CleanInteractions:
    frame: pd.DataFrame
    counts: dict[str, int]
    user_ids: np.ndarray  # sorted distinct ids present in frame
    item_ids: np.ndarray


def _clean_interactions(frame: pd.DataFrame) -> _CleanInteractions:
    for column in (USER_ID, ITEM_ID):
        if column not in frame.columns:
            raise DataError(f"interactions: missing column {column}")
    user_codes, user_ids = factorize_ids(frame[USER_ID])
    item_codes, item_ids = factorize_ids(frame[ITEM_ID])
    seconds = _timestamps(frame)
    labels = _labels(frame)
    has_ids = (user_codes >= 0) & (item_codes >= 0)
    valid = has_ids & ~np.isnan(seconds)
    timestamps = np.floor(np.where(valid, seconds, 0.0)).astype(np.int64)
    rows = _first_per_pair(np.flatnonzero(valid), user_codes * len(item_ids) + item_codes,
                           timestamps, labels)
    rows = rows[_sort_order([(user_codes[rows], len(user_ids)),
                             _time_codes(timestamps[rows], len(user_ids) * len(item_ids)),
                             (item_codes[rows], len(item_ids))])]
    cleaned = pd.DataFrame({
        USER_ID: pd.Series(user_ids[user_codes[rows]], dtype=object),
        ITEM_ID: pd.Series(item_ids[item_codes[rows]], dtype=object),
        TIMESTAMP: timestamps[rows], LABEL: labels[rows]})
    if TRUE_PROBABILITY in frame.columns:
        cleaned[TRUE_PROBABILITY] = pd.to_numeric(frame[TRUE_PROBABILITY], errors="coerce") \
            .to_numpy(dtype="float64")[rows]
    counts = {"missing_id": int((~has_ids).sum()),
              "missing_time": int((has_ids & ~valid).sum()),
              "duplicates": int(valid.sum()) - len(rows)}
    return _CleanInteractions(cleaned, counts, user_ids[np.unique(user_codes[rows])],
                              item_ids[np.unique(item_codes[rows])])


def _timestamps(frame: pd.DataFrame) -> np.ndarray:
    """Timestamps as float64 (NaN when missing); the row order when there is no column."""
    if TIMESTAMP not in frame.columns:
        return np.arange(len(frame), dtype="float64")
    return pd.to_numeric(frame[TIMESTAMP], errors="coerce").to_numpy(dtype="float64")


def _labels(frame: pd.DataFrame) -> np.ndarray:
    """Labels as int8; every row is a positive when there is no column."""
    if LABEL not in frame.columns:
        return np.ones(len(frame), dtype=np.int8)
    labels = pd.to_numeric(frame[LABEL], errors="coerce").to_numpy(dtype="float64")
    invalid = np.flatnonzero(~np.isin(labels, (0.0, 1.0)))
    if len(invalid):
        found = _id_text(frame[LABEL].iloc[invalid[0]])
        raise DataError(f"interactions: label must be 0 or 1, found {found or 'nothing'}")
    return labels.astype(np.int8)


def _first_per_pair(rows: np.ndarray, pairs: np.ndarray, timestamps: np.ndarray,
                    labels: np.ndarray) -> np.ndarray:
    """`rows` less repeats: of each (user, item) pair, the row with the highest label, earliest
    among those (the first in file order on a full tie). pairs: one code per (user, item).
    """
    # Repeats are usually rare, so find them with one fast sort and lexsort only those rows.
    by_pair = np.argsort(pairs[rows])
    sorted_pairs = pairs[rows[by_pair]]
    repeated = sorted_pairs[1:] == sorted_pairs[:-1]
    if not repeated.any():
        return rows
    in_group = np.zeros(len(rows), dtype=bool)
    in_group[1:] |= repeated
    in_group[:-1] |= repeated
    grouped = rows[np.sort(by_pair[in_group])]  # file order, which lexsort keeps for ties
    grouped = grouped[np.lexsort((timestamps[grouped], -labels[grouped].astype(np.int16),
                                  pairs[grouped]))]
    first = np.ones(len(grouped), dtype=bool)
    first[1:] = pairs[grouped][1:] != pairs[grouped][:-1]
    keep = np.ones(len(rows), dtype=bool)
    keep[by_pair[in_group]] = False
    return np.sort(np.concatenate([rows[keep], grouped[first]]))


def _time_codes(timestamps: np.ndarray, other_keys: int) -> tuple[np.ndarray, int]:
    """Timestamps as sort codes with an upper bound small enough to share an int64 key with
    `other_keys` combinations: offsets when the time span allows, else (slower) ranks."""
    if not len(timestamps):
        return timestamps, 1
    span = int(timestamps.max()) - int(timestamps.min()) + 1
    if span * other_keys < _INT64_KEYS:
        return timestamps - timestamps.min(), span
    unique, ranks = np.unique(timestamps, return_inverse=True)
    return ranks, len(unique)


def _sort_order(keys: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The order sorting rows by `keys`, most significant first; each key: codes in [0, bound).

    One argsort of a combined int64 key is several times faster than np.lexsort; the combined
    key must be unique per row (ties would come out in no particular order).
    """
    if math.prod(bound for _, bound in keys) < _INT64_KEYS:
        combined = np.zeros(len(keys[0][0]), dtype=np.int64)
        for codes, bound in keys:
            combined = combined * bound + codes
        return np.argsort(combined)
    return np.lexsort([codes for codes, _ in reversed(keys)])


def _clean_entities(table: pd.DataFrame, id_column: str, spec: FeatureSpec,
                    interacted_ids: np.ndarray, *, only_interacted: bool,
                    keep_display: bool) -> tuple[pd.DataFrame, dict[str, int]]:
    """A user or item table keyed by every id it must cover, features normalised.

    interacted_ids: the sorted distinct ids of the cleaned interactions.
    """
    if id_column not in table.columns:
        if len(table) or spec.names:
            raise DataError(f"{id_column.removesuffix('_id')}s table: missing column {id_column}")
        table = pd.DataFrame({id_column: pd.Series(dtype=object)})
    codes, table_ids = factorize_ids(table[id_column])
    with_id = np.flatnonzero(codes >= 0)
    # np.unique's codes come out sorted, matching table_ids; return_index keeps the first row.
    _, first = np.unique(codes[with_id], return_index=True)
    ids = interacted_ids if only_interacted else _sorted_union(interacted_ids, table_ids)
    positions = pd.Index(table_ids, dtype=object).get_indexer(pd.Index(ids, dtype=object))
    # The trailing -1 is what position -1 (an id the table lacks) picks.
    source_rows = np.append(with_id[first], -1)[positions]
    cleaned = pd.DataFrame({id_column: pd.Series(ids, dtype=object)})
    for column in _entity_columns(table, id_column, spec, keep_display):
        raw = table[column].to_numpy() if column in table.columns else np.full(len(table), np.nan)
        values = pd.Series(pd.api.extensions.take(raw, source_rows, allow_fill=True))
        cleaned[column] = _normalise(values, column, spec)
    used = pd.Index(table_ids, dtype=object).isin(pd.Index(interacted_ids, dtype=object))
    counts = {"duplicates": len(with_id) - len(first),
              "unused": int((~used).sum()) if only_interacted else 0,
              "added": int((source_rows < 0).sum())}
    return cleaned, counts


def _entity_columns(table: pd.DataFrame, id_column: str, spec: FeatureSpec,
                    keep_display: bool) -> list[str]:
    """The feature columns in spec order, then (items only) the display columns."""
    extra = [str(column) for column in table.columns
             if column != id_column and column not in spec.names]
    return list(spec.names) + (extra if keep_display else [])


def _sorted_union(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.array(sorted(set(first).union(second)), dtype=object)


def _normalise(values: pd.Series, column: str, spec: FeatureSpec) -> pd.Series:
    if column in spec.numeric:
        return pd.to_numeric(values, errors="coerce").astype("float64")
    if column in spec.multi:
        return pd.Series([tag_list(value) for value in values], dtype=object)
    if column in spec.categorical or is_string_dtype(values) or is_object_dtype(values):
        return category_strings(values)
    return values


def category_strings(values: pd.Series) -> pd.Series:
    """Categorical values as stripped str (dtype object); "" where missing."""
    codes, unique = pd.factorize(values)
    texts = np.array([_id_text(value) or "" for value in unique] + [""], dtype=object)
    return pd.Series(texts[codes], index=values.index, dtype=object)


def tag_list(value: object) -> list[str]:
    """One multi-feature cell as a list of distinct non-empty str, in their original order.

    Accepts lists, tuples, numpy arrays (Parquet) and `|`-joined text; anything missing is [].
    """
    if isinstance(value, str):
        items: list[object] = list(value.split("|"))
    elif isinstance(value, list | tuple | np.ndarray | pd.Series):
        items = list(value)
    else:
        items = [value]
    texts = (_id_text(item) for item in items if not _is_missing(item))
    return list(dict.fromkeys(text for text in texts if text is not None))


def _is_missing(value: object) -> bool:
    """True for None, NaN, pd.NA and NaT: scalars only (a list cell is never "missing")."""
    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, float | np.floating) and bool(np.isnan(value)))
