"""The catalog's indexes: id -> row, row -> id, and attribute value -> rows (for filters).

The ids stay one Arrow string array; lookups go through their sorted 64-bit hashes and every
hit is confirmed against the id itself. At 1M ids this is about 30 MB, where Python strings in
a pandas hash index took about 180 MB of each server process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

# Ids turned into Python strings at once while hashing or digesting, to bound the transient.
BLOCK = 1 << 16


class DuplicateIds(ValueError):
    pass


def hash_ids(ids: Sequence[str] | NDArray[np.object_]) -> NDArray[np.uint64]:
    # pandas' vectorised SipHash with its fixed key: the same id hashes the same everywhere.
    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


class ItemIndex:
    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        self.ids: pa.Array = ids.cast(pa.large_string())
        if self.ids.null_count:
            raise ValueError(f"{self.ids.null_count} item ids are missing")
        # One pass over the ids as Python strings, a block at a time: their hashes, and the
        # digest that identifies the catalog order (a cached matrix is only valid for the
        # same rows).
        digest, blocks = hashlib.sha256(), [np.zeros(0, np.uint64)]
        for start in range(0, len(self.ids), BLOCK):
            block = self.ids.slice(start, BLOCK).to_pylist()
            blocks.append(hash_ids(block))
            digest.update(b"".join(i.encode("utf-8", "surrogatepass") + b"\0" for i in block))
        self.digest = digest.hexdigest()
        hashes = np.concatenate(blocks)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.rows = hashes[order], order.astype(np.int64)
        self.colliding: dict[str, int] = {}
        shared = np.flatnonzero(self.hashes[1:] == self.hashes[:-1])
        if len(shared):
            self._split_collisions(np.union1d(shared, shared + 1))

    def _split_collisions(self, positions: NDArray[np.intp]) -> None:
        """Ids whose hash another id shares (about one pair in 10^7 catalogs of 1M) go to a
        dict; a duplicate id is an error."""
        for position in positions:
            row = int(self.rows[position])
            item_id = self.ids[row].as_py()
            if item_id in self.colliding:
                raise DuplicateIds(f"item id {item_id!r} appears more than once")
            self.colliding[item_id] = row
        keep = np.ones(len(self.hashes), dtype=bool)
        keep[positions] = False
        self.hashes, self.rows = self.hashes[keep], self.rows[keep]

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, item_ids: Sequence[str]) -> NDArray[np.intp]:
        """The catalog row of each id, -1 for an unknown one."""
        found = np.full(len(item_ids), -1, dtype=np.intp)
        if not item_ids or not len(self.hashes):
            return self._colliding_rows(item_ids, found)
        wanted = hash_ids(item_ids)
        at = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        hit = np.flatnonzero(self.hashes[at] == wanted)
        if len(hit):
            rows = self.rows[at[hit]]
            # An unknown id may share a known id's hash: compare the ids themselves.
            same = pc.equal(self.ids.take(pa.array(rows)),
                            pa.array([item_ids[int(n)] for n in hit], pa.large_string()))
            confirmed = same.to_numpy(zero_copy_only=False)
            found[hit[confirmed]] = rows[confirmed]
        return self._colliding_rows(item_ids, found)

    def _colliding_rows(self, item_ids: Sequence[str],
                        found: NDArray[np.intp]) -> NDArray[np.intp]:
        if self.colliding:
            for n, item_id in enumerate(item_ids):
                found[n] = self.colliding.get(item_id, found[n])
        return found

    def ids_at(self, rows: NDArray[np.integer] | Sequence[int]) -> list[str]:
        return list(self.ids.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist())


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
