"""Raw feature values -> the string/float tensors the SavedModel's signatures take."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from service.data.dataset import FeatureSpec
from service.model_format import input_name


@dataclass(frozen=True)
class UserQuery:
    """One user as the user tower sees them."""

    user_id: str = ""
    features: dict[str, Any] = field(default_factory=dict)
    history: tuple[str, ...] = ()
    # The user's row in the version's user table when this is exactly a stored user (no
    # request overrides): its embedding is then computed once per version.
    stored_row: int | None = None
    # The history's catalog rows when already known (a stored user's), else looked up.
    seen_rows: tuple[int, ...] | None = None
    # When the request is made (Unix seconds; None: now), for a model that takes the query time.
    time: float | None = None


def padded_strings(rows: Sequence[Sequence[str]], width: int | None = None,
                   left: bool = False) -> tf.Tensor:
    """A [B, W] string tensor padded with "" (W >= 1), keeping the last W values of each row."""
    width = width or max(1, max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), "", dtype=object)
    for i, row in enumerate(rows):
        values = list(row)[-width:]
        if values:
            if left:
                out[i, width - len(values):] = values
            else:
                out[i, :len(values)] = values
    return tf.constant(out, dtype=tf.string)


def as_list(value: Any) -> list[str]:
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v) for v in value]
    return []


def as_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number


def side_features(spec: FeatureSpec, columns: Mapping[str, Sequence[Any]]) -> dict[str, tf.Tensor]:
    """Side-feature tensors from per-feature value lists (missing: "", [] or NaN)."""
    tensors: dict[str, tf.Tensor] = {}
    for name in spec.categorical:
        values = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                  for v in columns[name]]
        tensors[input_name(name)] = tf.constant(np.array(values, dtype=object), tf.string)
    for name in spec.multi:
        tensors[input_name(name)] = padded_strings([as_list(v) for v in columns[name]])
    for name in spec.numeric:
        tensors[input_name(name)] = tf.constant(
            np.array([as_float(v) for v in columns[name]], dtype=np.float32))
    return tensors


def user_inputs(spec: FeatureSpec, history_length: int,
                users: Sequence[UserQuery]) -> dict[str, tf.Tensor]:
    columns = {name: [u.features.get(name) for u in users] for name in spec.names}
    tensors = side_features(spec, columns)
    tensors["user_id"] = tf.constant(np.array([u.user_id for u in users], dtype=object),
                                     tf.string)
    tensors["history"] = padded_strings([u.history for u in users], history_length, left=True)
    return tensors


def item_inputs(spec: FeatureSpec, items: Mapping[str, Sequence[Any]]) -> dict[str, tf.Tensor]:
    """items: "item_id" and every feature, each a column of values (Arrow's to_pydict, or
    pandas' to_dict("list"))."""
    tensors = side_features(spec, items)
    tensors["item_id"] = tf.constant(np.array(items["item_id"], dtype=object), tf.string)
    return tensors
