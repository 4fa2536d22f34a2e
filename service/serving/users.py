"""The stored users of a version (users.parquet): features and history per user id.

They stay Arrow columns behind an IdIndex, the history ids dictionary-encoded, and a user
becomes Python objects only when a request names them. As one Python object per user, 50k
users took 27 MiB and 4 s to read; a million users with long histories would take gigabytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.data.dataset import USER_ID
from service.model_format import HISTORY_COLUMN
from service.serving.id_index import IdIndex

# Users turned into Python objects at once when all of them are walked (publishing to Redis).
BLOCK_ROWS = 8192
DECODED = pa.large_list(pa.string())


@dataclass(frozen=True)
class StoredUser:
    features: dict[str, Any]  # missing values left out: the tower treats them as missing
    history: tuple[str, ...]


class StoredUsers:
    def __init__(self, table: pa.Table, feature_names: list[str]) -> None:
        self.index = IdIndex(table.column(USER_ID), kind="user")
        self.features = {name: table.column(name).combine_chunks() for name in feature_names}
        self.history = _dictionary_lists(table.column(HISTORY_COLUMN).combine_chunks())

    def __len__(self) -> int:
        return len(self.index)

    def get(self, user_id: str) -> StoredUser | None:
        row = self.index.row_of(user_id)
        if row < 0:
            return None
        return _user({name: column[row].as_py() for name, column in self.features.items()},
                     self.history[row].as_py())

    def items(self) -> Iterator[tuple[str, StoredUser]]:
        """Every (id, user), in table order."""
        for start in range(0, len(self), BLOCK_ROWS):
            ids = self.index.ids.slice(start, BLOCK_ROWS).to_pylist()
            features = {name: column.slice(start, BLOCK_ROWS).to_pylist()
                        for name, column in self.features.items()}
            # Decoded in Arrow first: Python conversion of dictionary values is ~8x slower.
            histories = self.history.slice(start, BLOCK_ROWS).cast(DECODED).to_pylist()
            for n, (user_id, history) in enumerate(zip(ids, histories, strict=True)):
                yield user_id, _user({name: values[n] for name, values in features.items()},
                                     history)


def read_users(path: Path, feature_names: list[str]) -> StoredUsers:
    return StoredUsers(pq.read_table(path, columns=[USER_ID, HISTORY_COLUMN, *feature_names]),
                       feature_names)


def _dictionary_lists(history: pa.Array) -> pa.LargeListArray:
    """The history lists with their ids dictionary-encoded (each distinct id stored once); a
    missing history is an empty one."""
    if not (pa.types.is_list(history.type) or pa.types.is_large_list(history.type)):
        raise ValueError(f"column {HISTORY_COLUMN!r} is {history.type}, not a list of ids")
    lengths = pc.fill_null(pc.list_value_length(history), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    values = pc.dictionary_encode(pc.cast(pc.list_flatten(history), pa.string()))
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)


def _user(features: dict[str, Any], history: list[str] | None) -> StoredUser:
    return StoredUser({name: value for name, value in features.items() if not _missing(value)},
                      tuple(i for i in history or () if i is not None))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
