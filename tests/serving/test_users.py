"""StoredUsers: a version's user table read from Parquet, looked up one user at a time."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.serving.id_index import DuplicateIds, IdIndex
from service.serving.users import BLOCK_ROWS, StoredUser, read_users

FEATURES = ["gender", "age", "langs"]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    schema = pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.string())),
                        ("gender", pa.string()), ("age", pa.float64()),
                        ("langs", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
    return path


def test_a_user_comes_back_with_missing_values_left_out(tmp_path: Path) -> None:
    users = read_users(write(tmp_path / "users.parquet", [
        {"user_id": "196", "history": ["242", "302", "242"], "gender": "M", "age": 49.0,
         "langs": ["en", "fr"]},
        {"user_id": "7", "history": None, "gender": None, "age": math.nan, "langs": None},
        {"user_id": "é🙂", "history": ["1", None, "2"], "gender": "F", "age": None,
         "langs": []},
    ]), FEATURES)
    assert len(users) == 3
    assert users.get("196") == StoredUser({"gender": "M", "age": 49.0, "langs": ["en", "fr"]},
                                          ("242", "302", "242"))
    assert users.get("7") == StoredUser({}, ())
    assert users.get("é🙂") == StoredUser({"gender": "F", "langs": []}, ("1", "2"))
    assert users.get("unknown") is None and users.get("") is None


def test_read_against_a_catalog_a_user_knows_the_rows_it_has_seen(tmp_path: Path) -> None:
    """exclude_seen needs the history's catalog rows: looked up once when the users are read,
    ids missing from the catalog left out, repeats kept (excluding twice is harmless)."""
    catalog = IdIndex(pa.array(["302", "1", "242", "9"]))
    users = read_users(write(tmp_path / "users.parquet", [
        {"user_id": "196", "history": ["242", "302", "gone", "242"]},
        {"user_id": "7", "history": None}]), FEATURES, catalog)
    seen = {user_id: user.seen_rows for user_id in ("196", "7")
            if (user := users.get(user_id)) is not None}
    assert seen == {"196": (2, 0, 2), "7": ()}
    unlinked = read_users(tmp_path / "users.parquet", FEATURES).get("7")
    assert unlinked is not None and unlinked.seen_rows is None


def test_walking_every_user_agrees_with_lookups(tmp_path: Path) -> None:
    """More users than one block, so the walk crosses block boundaries."""
    n = BLOCK_ROWS + 5
    rows: list[dict[str, object]] = [
        {"user_id": f"u{i}", "history": [f"i{i % 7}", f"i{i % 11}"][:i % 3],
         "gender": "F" if i % 2 else None, "age": float(i) if i % 5 else None,
         "langs": ["en"] if i % 4 == 0 else None} for i in range(n)]
    users = read_users(write(tmp_path / "users.parquet", rows), FEATURES)
    walked = list(users.items())
    assert [user_id for user_id, _ in walked] == [f"u{i}" for i in range(n)]
    for user_id, user in walked[::97] + walked[-3:]:
        assert users.get(user_id) == user
    assert walked[4] == ("u4", StoredUser({"age": 4.0, "langs": ["en"]}, ("i4",)))


def test_duplicate_user_ids_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "users.parquet", [
        {"user_id": "1", "history": [], "gender": "M", "age": 1.0, "langs": []},
        {"user_id": "1", "history": [], "gender": "F", "age": 2.0, "langs": []}])
    with pytest.raises(DuplicateIds, match="user id '1'"):
        read_users(path, FEATURES)
