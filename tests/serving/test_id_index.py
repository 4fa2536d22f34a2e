"""IdIndex: id <-> row lookups, including ids whose hashes collide, and the catalog digest."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from numpy.typing import NDArray

from service.serving import id_index
from service.serving.id_index import DuplicateIds, IdIndex

IDS = ["242", "302", "m1", "", "é🙂", "10", "1"]


def test_rows_of_known_unknown_and_order() -> None:
    index = IdIndex(pa.array(IDS))
    asked = ["1", "nope", "242", "é🙂", "", "242", "01"]
    assert index.rows_of(asked).tolist() == [6, -1, 0, 4, 3, 0, -1]
    assert index.rows_of([]).tolist() == []
    assert len(index) == len(IDS)


def test_ids_at_gives_the_ids_back() -> None:
    index = IdIndex(pa.chunked_array([IDS[:3], IDS[3:]]))
    rows = np.array([4, 0, 6, 0])
    assert index.ids_at(rows) == ["é🙂", "242", "1", "242"]
    assert index.ids_at(np.zeros(0, dtype=np.int64)) == []


def test_one_id_lookups_on_a_slice_of_a_larger_array() -> None:
    """row_of and ids_at read the ids' bytes in place: an Arrow array that starts inside its
    buffers (a slice) must still give each id back."""
    index = IdIndex(pa.array(["x", "y", *IDS]).slice(2))
    assert [index.row_of(i) for i in IDS] == list(range(len(IDS)))
    assert index.ids_at(np.arange(len(IDS))) == IDS
    assert [index.row_of(i) for i in ("x", "nope", "\ud800", "é")] == [-1, -1, -1, -1]


def test_digest_is_sha256_of_ids_each_ended_by_nul() -> None:
    want = hashlib.sha256(b"".join(i.encode() + b"\0" for i in IDS)).hexdigest()
    assert IdIndex(pa.array(IDS)).digest == want
    assert IdIndex(pa.array(IDS[::-1])).digest != want


def test_duplicate_and_missing_ids_are_refused() -> None:
    with pytest.raises(DuplicateIds, match="'302'"):
        IdIndex(pa.array(["1", "302", "2", "302"]))
    with pytest.raises(ValueError, match="1 item ids are missing"):
        IdIndex(pa.array(["1", None, "2"]))


def test_colliding_hashes_are_still_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash that keeps only the first character makes most ids collide."""
    def first_char(ids: Sequence[str] | NDArray[np.object_]) -> NDArray[np.uint64]:
        return np.array([ord(i[0]) if i else 0 for i in ids], dtype=np.uint64)

    monkeypatch.setattr(id_index, "hash_ids", first_char)
    catalog = ["a1", "a2", "b1", "a3", "c1", ""]
    index = IdIndex(pa.array(catalog))
    assert index.rows_of(["a3", "b1", "a9", "c1", "b2", "", "a1", "z"]).tolist() == \
        [3, 2, -1, 4, -1, 5, 0, -1]
    with pytest.raises(DuplicateIds):
        IdIndex(pa.array(["a1", "a2", "a1"]))


def test_a_large_catalog_round_trips() -> None:
    ids = [f"item-{n}" for n in range(200_000)]
    index = IdIndex(pa.array(ids))
    rows = np.random.default_rng(0).integers(0, len(ids), 1000)
    assert index.rows_of([ids[r] for r in rows]).tolist() == rows.tolist()
    assert index.ids_at(rows) == [ids[r] for r in rows]
