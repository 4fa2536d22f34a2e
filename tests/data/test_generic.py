"""The generic layout: CSV and Parquet tables, feature kind inference, errors with line numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.data.errors import DataError
from service.data.generic import infer_features, load_generic, read_delimited


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_interactions_without_timestamp_or_label(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id\n007,a\n007,b\n8,a\n")

    dataset = load_generic(tmp_path)

    assert dataset.interactions["user_id"].tolist() == ["007", "007", "8"]  # ids stay text
    assert dataset.interactions["timestamp"].tolist() == [0, 1, 2]  # row order is time order
    assert dataset.interactions["label"].tolist() == [1, 1, 1]
    assert not dataset.has_labels
    assert not dataset.has_time  # so the model learns nothing from the query time
    assert dataset.user_features.names == () and dataset.item_features.names == ()


def test_labels_with_negatives_set_has_labels(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv",
           "user_id,item_id,timestamp,label\nu,a,10,1\nu,b,11,0\n")

    dataset = load_generic(tmp_path)

    assert dataset.has_labels
    assert dataset.interactions["label"].tolist() == [1, 0]
    assert dataset.interactions["label"].dtype == np.int8


def test_iso_timestamps_become_unix_seconds(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv",
           "user_id,item_id,timestamp\nu,a,1970-01-01T00:01:00Z\nu,b,1970-01-02\n")

    dataset = load_generic(tmp_path)

    assert dataset.interactions["timestamp"].tolist() == [60, 86400]
    assert dataset.has_time


@pytest.mark.parametrize(("rows", "message"), [
    ("u,a,10,1\n\nu,b,11,2\n", r"interactions\.csv line 4: label must be 0 or 1, got 2"),
    ("u,a,10,1\nu,b,,1\n", r"interactions\.csv line 3: missing timestamp"),
    ("u,a,10,1\nu,b,soon,1\n", r"interactions\.csv line 3: timestamp 'soon' is neither"),
    ("u,a,10,1\nu,b,11\n", r"interactions\.csv line 3: expected 4 comma-separated fields, got 3"),
    ("u,a,10,1,9\n", r"interactions\.csv line 2: expected 4 comma-separated fields, got 5"),
])
def test_bad_rows_name_the_line(tmp_path: Path, rows: str, message: str) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,label\n" + rows)

    with pytest.raises(DataError, match=message):
        load_generic(tmp_path)


def test_missing_id_column_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user,item_id\nu,a\n")

    with pytest.raises(DataError, match=r"interactions\.csv: missing column user_id"):
        load_generic(tmp_path)


def test_csv_and_parquet_together_is_ambiguous(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id\nu,a\n")
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"]}),
                   tmp_path / "interactions.parquet")

    with pytest.raises(DataError, match=r"both interactions\.csv and interactions\.parquet"):
        load_generic(tmp_path)


def test_csv_feature_kinds_are_inferred(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id\nu1,i1\nu2,i2\n")
    _write(tmp_path / "users.csv",
           "user_id,name,age,country,vip\nu1,Ann,31,FR,true\nu2,Bo,,DE,false\n")
    _write(tmp_path / "items.csv",
           'item_id,title,category,tags,price\ni1,"Kettle, blue",home,gift|kitchen,19.9\n'
           "i2,Shoes,sport,outdoor,79\n")

    dataset = load_generic(tmp_path)

    assert dataset.user_features.categorical == ("country",)
    assert dataset.user_features.numeric == ("age", "vip")
    assert dataset.item_features.categorical == ("category",)
    assert dataset.item_features.multi == ("tags",)
    assert dataset.item_features.numeric == ("price",)
    assert dataset.items["tags"].tolist() == [["gift", "kitchen"], ["outdoor"]]
    assert dataset.items["title"].tolist() == ["Kettle, blue", "Shoes"]


def test_parquet_layout_with_list_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"user_id": [1, 2, 2], "item_id": ["a", "b", "a"],
                             "timestamp": pa.array([5, 6, 7], pa.int64()),
                             "label": [1, 0, 1]}), tmp_path / "interactions.parquet")
    pq.write_table(pa.table({"item_id": ["a", "b"], "genres": [["x", "y"], None],
                             "kind": ["p|q", "r"], "weight": [1.5, None]}),
                   tmp_path / "items.parquet")

    dataset = load_generic(tmp_path)

    assert dataset.item_features.multi == ("genres",)
    assert dataset.item_features.categorical == ("kind",)  # Parquet text is never split
    assert dataset.item_features.numeric == ("weight",)
    assert list(dataset.items["genres"].iloc[0]) == ["x", "y"]
    assert dataset.has_labels


def test_parquet_bad_label_names_the_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "label": [1, 3]}),
                   tmp_path / "interactions.parquet")

    with pytest.raises(DataError, match=r"interactions\.parquet: row 2: label must be 0 or 1"):
        load_generic(tmp_path)


def test_unreadable_parquet_is_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.parquet", "not parquet")

    with pytest.raises(DataError, match=r"interactions\.parquet: not a readable Parquet file"):
        load_generic(tmp_path)


def test_undecodable_text_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_bytes(b"user_id,item_id\nu,caf\xe9\n")

    with pytest.raises(DataError, match=r"interactions\.csv: not valid utf-8 text"):
        load_generic(tmp_path)


def test_empty_file_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "interactions.csv", "")

    with pytest.raises(DataError, match=r"interactions\.csv: the file is empty"):
        read_delimited(path, sep=",")


def test_infer_features_skips_display_columns() -> None:
    frame = pd.DataFrame({"item_id": ["a"], "Title": ["A"], "name": ["n"], "n": [1]})

    _, spec = infer_features(frame, "item_id")

    assert spec.names == ("n",)


def test_parquet_saved_with_a_pandas_index(tmp_path: Path) -> None:
    frame = pd.DataFrame({"item_id": ["a", "b"], "label": [1, 0]},
                         index=pd.Index(["x", "y"], name="user_id"))
    frame.to_parquet(tmp_path / "interactions.parquet")

    dataset = load_generic(tmp_path)

    assert dataset.interactions["user_id"].tolist() == ["x", "y"]
