"""The stored users of a version (users.parquet): features and history per user id.

They stay Arrow columns behind an IdIndex, the history ids dictionary-encoded, and a user
becomes Python objects only when a request names them: a million users with 25 history ids
each took 813 MiB and 78 s to read as one Python object per user, 202 MiB and 7 to 13 s this way
(bench/users_memory.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from service.data.dataset import USER_ID
from service.model_format import HISTORY_COLUMN
from service.serving.id_index import ArrowStrings, IdIndex

# Users turned into Python objects at once when all of them are walked (publishing to Redis).
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class StoredUser:
    features: dict[str, Any]  # missing values left out: the tower treats them as missing
    history: tuple[str, ...]
    # The catalog rows of the history's ids (those in the catalog), for exclude_seen; known
    # only when the users were read against a catalog.
    seen_rows: tuple[int, ...] | None = field(default=None, compare=False)
    row: int = field(default=-1, compare=False)  # in the user table


class StoredUsers:
    def __init__(self, table: pa.Table, feature_names: list[str],
                 catalog: IdIndex | None = None) -> None:
        self.index = IdIndex(table.column(USER_ID), kind="user")
        self.features = {name: table.column(name).combine_chunks() for name in feature_names}
        self._starts, self._codes, self._history_ids = _encoded_histories(
            table.column(HISTORY_COLUMN).combine_chunks())
        # Each distinct history id's catalog row (-1: not in the catalog), looked up once here
        # instead of on every request that excludes what the user has seen.
        self._catalog_rows = (catalog.rows_of(self._history_ids.to_pylist())
                              if catalog is not None else None)
        # Read in place for one user: an Arrow call per request costs 30 to 60 us.
        self._history_names = ArrowStrings(self._history_ids)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, user_id: str) -> StoredUser | None:
        row = self.index.row_of(user_id)
        if row < 0:
            return None
        return _user({name: column[row].as_py() for name, column in self.features.items()},
                     self._history(row), row, self._seen_rows(row))

    def items(self) -> Iterator[tuple[str, StoredUser]]:
        """Every (id, user), in table order."""
        for start in range(0, len(self), BLOCK_ROWS):
            ids = self.index.ids.slice(start, BLOCK_ROWS).to_pylist()
            features = {name: column.slice(start, BLOCK_ROWS).to_pylist()
                        for name, column in self.features.items()}
            histories = self._histories(start, start + len(ids))
            for n, (user_id, history) in enumerate(zip(ids, histories, strict=True)):
                yield user_id, _user({name: values[n] for name, values in features.items()},
                                     history, start + n)

    def _seen_rows(self, row: int) -> tuple[int, ...] | None:
        if self._catalog_rows is None:
            return None
        seen = self._catalog_rows[self._codes[self._starts[row]:self._starts[row + 1]]]
        return tuple(seen[seen >= 0].tolist())

    def _history(self, row: int) -> tuple[str, ...]:
        return tuple(self._history_names.at(self._codes[self._starts[row]:self._starts[row + 1]]))

    def _histories(self, first: int, stop: int) -> list[tuple[str, ...]]:
        """The histories of rows first..stop-1, decoded in one Arrow call."""
        starts = self._starts[first:stop + 1]
        names = self._history_ids.take(pa.array(self._codes[starts[0]:starts[-1]])).to_pylist()
        starts = starts - starts[0]
        return [tuple(names[a:b]) for a, b in itertools.pairwise(starts)]


def read_users(path: Path, feature_names: list[str],
               catalog: IdIndex | None = None) -> StoredUsers:
    with pq.ParquetFile(path) as table_file:  # not pq.read_table: see loader.read_tables
        table = table_file.read(columns=[USER_ID, HISTORY_COLUMN, *feature_names])
    return StoredUsers(table, feature_names, catalog)


def _encoded_histories(history: pa.Array) -> tuple[NDArray[np.int64], NDArray[np.int32],
                                                    pa.Array]:
    """Row starts [n + 1] into one array of codes, and the distinct ids the codes index:
    each distinct id is stored once. Missing histories and missing ids in them are dropped."""
    if not (pa.types.is_list(history.type) or pa.types.is_large_list(history.type)):
        raise ValueError(f"column {HISTORY_COLUMN!r} is {history.type}, not a list of ids")
    ids, rows = pc.list_flatten(history), pc.list_parent_indices(history)
    present = pc.is_valid(ids)
    ids, rows = ids.filter(present), rows.filter(present)
    lengths = np.bincount(rows.to_numpy(), minlength=len(history))
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    encoded = pc.dictionary_encode(pc.cast(ids, pa.string()))
    return starts, encoded.indices.to_numpy(), encoded.dictionary


def _user(features: dict[str, Any], history: tuple[str, ...], row: int,
          seen_rows: tuple[int, ...] | None = None) -> StoredUser:
    return StoredUser({name: value for name, value in features.items() if not _missing(value)},
                      history, seen_rows, row)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
