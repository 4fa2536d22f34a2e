"""The stored users of a version: features and history per user id, from users.parquet."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from service.data.dataset import USER_ID
from service.model_format import HISTORY_COLUMN
from service.serving.inputs import as_list

BATCH_ROWS = 8192


@dataclass(frozen=True)
class StoredUser:
    features: dict[str, Any]  # missing values left out: the tower treats them as missing
    history: tuple[str, ...]


def read_users(path: Path, feature_names: list[str]) -> dict[str, StoredUser]:
    """Read in batches, so the table never sits in memory beside its Python form."""
    users: dict[str, StoredUser] = {}
    columns = [USER_ID, HISTORY_COLUMN, *feature_names]
    for batch in pq.ParquetFile(path).iter_batches(BATCH_ROWS, columns=columns):
        table = batch.to_pandas()
        features = (table[feature_names].to_dict("records") if feature_names
                    else [{}] * len(table))
        for uid, row, history in zip(table[USER_ID].astype(str), features,
                                     table[HISTORY_COLUMN], strict=True):
            # Interned: histories repeat the same item ids, one string each instead of one
            # per mention.
            users[uid] = StoredUser({str(k): v for k, v in row.items() if not _missing(v)},
                                    tuple(sys.intern(i) for i in as_list(history)))
    return users


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
