"""The in-memory form every data layout is loaded into, and what the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the serving process imports this module and never needs pandas
    import pandas as pd

# Column names shared by every layout once loaded.
USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
LABEL = "label"
# Synthetic data only: the planted click probability of each interaction row.
TRUE_PROBABILITY = "true_probability"


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns of a user or item table are model features, by kind.

    categorical: one string per row; multi: a list of strings per row (e.g. genres);
    numeric: one float per row (NaN when missing).
    """

    categorical: tuple[str, ...] = ()
    multi: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.categorical + self.multi + self.numeric

    def to_dict(self) -> dict[str, list[str]]:
        return {"categorical": list(self.categorical), "multi": list(self.multi),
                "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> FeatureSpec:
        return cls(tuple(data.get("categorical", ())), tuple(data.get("multi", ())),
                   tuple(data.get("numeric", ())))


@dataclass
class Dataset:
    """Interactions plus optional user and item tables.

    interactions: columns user_id (str), item_id (str), timestamp (int64), label (int8, 1 for
        every row of implicit-feedback data), and for synthetic data true_probability (float64).
    users: one row per user id: user_id (str) + the columns in user_features.
    items: one row per item id: item_id (str) + the columns in item_features, plus display-only
        columns (e.g. title) that are not features.
    has_labels: True when interactions carry explicit negatives (label 0 rows).
    has_time: False when the timestamps are only the rows' order (a layout without times):
        then there is no query time to learn from.
    """

    name: str
    source: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_features: FeatureSpec = field(default_factory=FeatureSpec)
    item_features: FeatureSpec = field(default_factory=FeatureSpec)
    has_labels: bool = False
    has_time: bool = True
