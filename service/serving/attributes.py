"""attribute -> value -> item rows: the catalog's filter index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

AttributeIndex = dict[str, dict[str, NDArray[np.int32]]]


def attribute_index(items: pa.Table, names: Sequence[str]) -> AttributeIndex:
    """attribute -> value -> item rows, for the named (categorical and multi-valued) columns.

    Computed in Arrow (flatten, dictionary-encode, sort the codes), so a million items with
    their genre lists never become Python objects."""
    return {name: rows_by_value(items.column(name).combine_chunks()) for name in names}


def rows_by_value(column: pa.Array) -> dict[str, NDArray[np.int32]]:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values, rows = pc.list_flatten(column), pc.list_parent_indices(column)
    else:
        values, rows = column, pa.array(np.arange(len(column)))
    if pa.types.is_floating(values.type):  # NaN is a missing value, not a value named "nan"
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
    encoded = pc.dictionary_encode(pc.cast(values, pa.string()))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(encoded.indices.is_null().to_numpy(zero_copy_only=False))
    codes, item_rows = codes[valid].astype(np.int64), rows.to_numpy()[valid].astype(np.int32)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
    return {str(value): item_rows[order[start:end]]
            for value, start, end in zip(encoded.dictionary.to_pylist(), bounds[:-1],
                                         bounds[1:], strict=True) if end > start}
