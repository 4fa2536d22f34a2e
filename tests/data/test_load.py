"""load_dataset: layout detection, clear errors, cleaning applied, and the real ML-100K."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.data.errors import DataError
from service.data.load import detect_layout, load_dataset

from .test_movielens import (
    ml100k_path,
    write_ml1m,
    write_ml100k,
    write_movielens_csv,
)


def _write_generic(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,i1,5\nu1,i1,3\n"
                                                " u2,i2,4\n")
    (directory / "items.csv").write_text("item_id,title,colour\ni1,One,red\ni3,Three,\n")
    return directory


@pytest.mark.parametrize(("writer", "layout", "name"), [
    (write_ml100k, "MovieLens 100K", "ml-100k"),
    (write_ml1m, "MovieLens 1M", "ml-1m"),
    (write_movielens_csv, "MovieLens CSV", "ml-latest-small"),
    (_write_generic, "generic", "ml-latest-small"),
])
def test_each_layout_is_detected_and_cleaned(tmp_path: Path, writer: Callable[[Path], Path],
                                             layout: str, name: str) -> None:
    directory = writer(tmp_path / "ml-latest-small")

    assert detect_layout(directory)[0].name == layout
    dataset = load_dataset(str(directory))

    assert dataset.name == name
    assert dataset.interactions["user_id"].dtype == object
    assert dataset.interactions["timestamp"].dtype == np.int64
    assert all(type(value) is str for value in dataset.items["item_id"])
    assert set(dataset.interactions["user_id"]) == set(dataset.users["user_id"])
    assert set(dataset.interactions["item_id"]) <= set(dataset.items["item_id"])


def test_generic_layout_is_cleaned(tmp_path: Path) -> None:
    dataset = load_dataset(_write_generic(tmp_path))

    assert dataset.interactions.to_dict("records") == [
        {"user_id": "u1", "item_id": "i1", "timestamp": 3, "label": 1},
        {"user_id": "u2", "item_id": "i2", "timestamp": 4, "label": 1}]
    assert dataset.items["item_id"].tolist() == ["i1", "i2", "i3"]
    assert dataset.items["colour"].tolist() == ["red", "", ""]
    assert dataset.item_features.categorical == ("colour",)


def test_a_marker_file_path_loads_its_directory(tmp_path: Path) -> None:
    directory = write_ml1m(tmp_path)

    assert load_dataset(directory / "ratings.dat").name == "ml-1m"


def test_movielens_wins_over_generic_files_in_the_same_directory(tmp_path: Path) -> None:
    directory = _write_generic(write_ml100k(tmp_path))

    assert detect_layout(directory)[0].name == "MovieLens 100K"


def test_unknown_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(DataError, match="no known data layout") as caught:
        load_dataset(tmp_path)
    for marker in ("u.data", "ratings.dat", "ratings.csv", "interactions.csv",
                   "interactions.parquet"):
        assert marker in str(caught.value)


def test_missing_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(tmp_path / "nowhere")


def test_a_stray_file_is_not_a_data_directory(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")

    with pytest.raises(DataError, match="expected a data directory"):
        load_dataset(path)


def test_real_ml100k_loads_and_cleans() -> None:
    path = ml100k_path()
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (set RECSYS_ML100K to its folder)")

    dataset = load_dataset(path)

    assert (len(dataset.interactions), len(dataset.users), len(dataset.items)) == (
        100_000, 943, 1682)
    assert dataset.interactions["label"].dtype == np.int8
    assert not dataset.has_labels
    assert dataset.users["zip_prefix"].isin([*"0123456789", ""]).all()
    toy_story = dataset.items.set_index("item_id").loc["1"]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["genre"] == ["Animation", "Children's", "Comedy"]
