"""clean(): ids, missing values, duplicates, table coverage, dtypes and determinism."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from service.data.cleaning import clean, clean_with_report, tag_list
from service.data.dataset import Dataset, FeatureSpec
from service.data.errors import DataError

USER_SPEC = FeatureSpec(categorical=("gender",), multi=("langs",), numeric=("age",))
ITEM_SPEC = FeatureSpec(categorical=("category",), multi=("genre",), numeric=("price",))


def _dataset(interactions: dict[str, list[object]], users: pd.DataFrame | None = None,
             items: pd.DataFrame | None = None) -> Dataset:
    return Dataset(
        name="toy", source="memory", interactions=pd.DataFrame(interactions),
        users=users if users is not None else pd.DataFrame({
            "user_id": [" 1", 2.0, "3", "9"], "gender": ["F", None, "M", "F"],
            "langs": ["en|fr", np.array(["de"]), None, []], "age": [30, None, 41, 50]}),
        items=items if items is not None else pd.DataFrame({
            "item_id": ["a", "b", "z"], "category": ["x", np.nan, "y"],
            "genre": [("g1", "g2", "g1"), None, ["g3", " "]], "price": ["1.5", None, 3],
            "title": ["A", None, "Z"]}),
        user_features=USER_SPEC, item_features=ITEM_SPEC)


def test_ids_become_stripped_python_strings() -> None:
    dataset = clean(_dataset({"user_id": [" 1", 2.0, 3], "item_id": ["a ", "b", "a"],
                              "timestamp": [1, 2, 3]}))

    interactions = dataset.interactions
    assert interactions["user_id"].tolist() == ["1", "2", "3"]
    assert interactions["item_id"].tolist() == ["a", "b", "a"]
    assert interactions["user_id"].dtype == object and interactions["item_id"].dtype == object
    assert all(type(value) is str for value in interactions["user_id"])
    assert interactions["timestamp"].dtype == np.int64
    assert interactions["label"].dtype == np.int8


def test_rows_without_ids_are_dropped() -> None:
    dataset, report = clean_with_report(_dataset({
        "user_id": ["1", None, "  ", "2"], "item_id": ["a", "a", "b", np.nan],
        "timestamp": [1, 2, 3, 4]}))

    assert dataset.interactions["user_id"].tolist() == ["1"]
    assert report.dropped_missing_id == 3


def test_duplicates_keep_max_label_at_its_earliest_time() -> None:
    dataset, report = clean_with_report(_dataset({
        "user_id": ["1", "1", "1", "1", "2"], "item_id": ["a", "a", "a", "b", "b"],
        "timestamp": [5, 9, 7, 3, 1], "label": [0, 1, 1, 0, 0],
        "true_probability": [0.1, 0.2, 0.3, 0.4, 0.5]}))

    rows = dataset.interactions.to_dict("records")
    assert rows == [
        {"user_id": "1", "item_id": "b", "timestamp": 3, "label": 0, "true_probability": 0.4},
        {"user_id": "1", "item_id": "a", "timestamp": 7, "label": 1, "true_probability": 0.3},
        {"user_id": "2", "item_id": "b", "timestamp": 1, "label": 0, "true_probability": 0.5},
    ]
    assert report.duplicates_collapsed == 2
    assert dataset.has_labels


def test_missing_timestamp_column_means_row_order() -> None:
    dataset = clean(_dataset({"user_id": ["1", "1"], "item_id": ["b", "a"]}))

    assert dataset.interactions["item_id"].tolist() == ["b", "a"]
    assert dataset.interactions["timestamp"].tolist() == [0, 1]
    assert not dataset.has_labels


def test_users_are_the_interacted_ones_with_normalised_features() -> None:
    dataset, report = clean_with_report(_dataset({
        "user_id": ["1", "2", "3", "4"], "item_id": ["a", "a", "a", "a"],
        "timestamp": [1, 2, 3, 4]}))

    users = dataset.users
    assert users["user_id"].tolist() == ["1", "2", "3", "4"]  # "9" never interacted
    assert users.columns.tolist() == ["user_id", "gender", "langs", "age"]
    assert users["gender"].tolist() == ["F", "", "M", ""]
    assert users["langs"].tolist() == [["en", "fr"], ["de"], [], []]
    assert users["age"].dtype == np.float64
    assert users["age"].tolist()[:1] == [30.0] and math.isnan(users["age"].iloc[1])
    assert math.isnan(users["age"].iloc[3])  # user 4 has no feature row
    assert report.users_without_interactions == 1
    assert report.users_without_features == 1


def test_items_cover_the_item_table_and_every_interacted_item() -> None:
    dataset, report = clean_with_report(_dataset({
        "user_id": ["1", "1"], "item_id": ["a", "new"], "timestamp": [1, 2]}))

    items = dataset.items
    assert items["item_id"].tolist() == ["a", "b", "new", "z"]
    assert items["category"].tolist() == ["x", "", "", "y"]
    assert items["genre"].tolist() == [["g1", "g2"], [], [], ["g3"]]
    assert items["price"].tolist()[0] == 1.5 and items["price"].dtype == np.float64
    assert items["title"].tolist() == ["A", "", "", "Z"]  # display-only columns are kept
    assert all(type(value) is str for value in items["category"])
    assert report.items_without_features == 1


def test_feature_columns_missing_from_a_table_are_added_empty() -> None:
    users = pd.DataFrame({"user_id": ["1"]})
    dataset = clean(_dataset({"user_id": ["1"], "item_id": ["a"]}, users=users))

    assert dataset.users.to_dict("records")[0]["gender"] == ""
    assert dataset.users["langs"].tolist() == [[]]


def test_duplicate_table_rows_keep_the_first() -> None:
    users = pd.DataFrame({"user_id": ["1", "1 "], "gender": ["F", "M"], "langs": [[], []],
                          "age": [1, 2]})
    dataset, report = clean_with_report(_dataset({"user_id": ["1"], "item_id": ["a"]},
                                                 users=users))

    assert dataset.users["gender"].tolist() == ["F"]
    assert report.duplicate_user_rows == 1


def test_clean_is_deterministic_and_idempotent() -> None:
    interactions = {"user_id": ["2", "1", "10", "1"], "item_id": ["a", "b", "a", "a"],
                    "timestamp": [4, 3, 2, 1]}
    first = clean(_dataset(interactions))
    shuffled = pd.DataFrame(interactions).sample(frac=1.0, random_state=3)
    second = clean(_dataset(shuffled.to_dict("list")))

    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    pd.testing.assert_frame_equal(first.items, second.items)
    assert first.interactions["user_id"].tolist() == ["1", "1", "10", "2"]
    again = clean(first)
    pd.testing.assert_frame_equal(again.interactions, first.interactions)
    pd.testing.assert_frame_equal(again.users, first.users)
    pd.testing.assert_frame_equal(again.items, first.items)


def test_invalid_label_is_a_data_error() -> None:
    with pytest.raises(DataError, match="label must be 0 or 1, found 2"):
        clean(_dataset({"user_id": ["1"], "item_id": ["a"], "label": [2]}))


def test_no_usable_interaction_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no interaction has both a user id and an item id"):
        clean(_dataset({"user_id": [None], "item_id": ["a"]}))


def test_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.data.cleaning"):
        clean(_dataset({"user_id": ["1", "1"], "item_id": ["a", "a"]}))

    assert "1 repeated (user, item) rows collapsed" in caplog.text


@pytest.mark.parametrize(("value", "expected"), [
    ("a| b|a", ["a", "b"]), (np.array(["x", "y"]), ["x", "y"]), ((1.0, 2), ["1", "2"]),
    (None, []), (float("nan"), []), (pd.NA, []), ([None, "", "c"], ["c"]), ("", []),
])
def test_tag_list(value: object, expected: list[str]) -> None:
    assert tag_list(value) == expected
