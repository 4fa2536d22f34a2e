"""The synthetic generator: determinism, shape, click rate, popularity skew and oracle AUC."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from service.data.cleaning import clean
from service.data.dataset import Dataset
from service.data.synthetic import GENRES, generate_synthetic

N_USERS = 2000
N_ITEMS = 3000


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return generate_synthetic(N_USERS, N_ITEMS, seed=7)


def test_same_seed_gives_identical_frames(dataset: Dataset) -> None:
    again = generate_synthetic(N_USERS, N_ITEMS, seed=7)

    pd.testing.assert_frame_equal(dataset.interactions, again.interactions)
    pd.testing.assert_frame_equal(dataset.users, again.users)
    pd.testing.assert_frame_equal(dataset.items, again.items)


def test_another_seed_gives_other_data(dataset: Dataset) -> None:
    other = generate_synthetic(N_USERS, N_ITEMS, seed=8)

    assert not other.interactions["label"].equals(dataset.interactions["label"])


def test_sizes_names_and_features(dataset: Dataset) -> None:
    assert dataset.name == "synthetic"
    assert dataset.source == "synthetic(users=2000, items=3000, seed=7)"
    assert dataset.has_labels
    assert len(dataset.users) == N_USERS and len(dataset.items) == N_ITEMS
    per_user = dataset.interactions.groupby("user_id").size()
    assert per_user.max() == 30 and (per_user == 30).mean() > 0.99
    assert dataset.user_features.to_dict() == {
        "categorical": ["gender", "country"], "multi": [], "numeric": ["age", "price_sensitivity"]}
    assert dataset.item_features.to_dict() == {
        "categorical": ["category"], "multi": ["genre"], "numeric": ["price", "year"]}
    users, items = dataset.users, dataset.items
    assert users["age"].between(18, 70).all() and users["price_sensitivity"].between(0, 1).all()
    assert users["country"].nunique() == 8
    assert items["category"].nunique() == 12
    assert items["genre"].map(len).between(1, 3).all()
    assert set(items["genre"].explode()) <= set(GENRES)
    assert (items["price"] > 0).all()
    assert items.set_index("item_id").loc["i17", "title"] == "Item 17"


def test_frames_are_already_clean(dataset: Dataset) -> None:
    cleaned = clean(dataset)

    pd.testing.assert_frame_equal(cleaned.interactions, dataset.interactions)
    pd.testing.assert_frame_equal(cleaned.users, dataset.users)
    pd.testing.assert_frame_equal(cleaned.items, dataset.items)
    assert dataset.interactions["true_probability"].dtype == np.float64


def test_timestamps_strictly_increase_per_user(dataset: Dataset) -> None:
    interactions = dataset.interactions
    same_user = interactions["user_id"].to_numpy()[1:] == interactions["user_id"].to_numpy()[:-1]

    assert (np.diff(interactions["timestamp"].to_numpy())[same_user] > 0).all()
    assert interactions["timestamp"].dtype == np.int64


def test_click_rate_and_oracle_auc(dataset: Dataset) -> None:
    labels = dataset.interactions["label"]
    probability = dataset.interactions["true_probability"]

    assert 0.15 <= labels.mean() <= 0.30
    assert 0.70 <= roc_auc_score(labels, probability) <= 0.85
    assert probability.between(0, 1, inclusive="neither").all()


def test_popularity_follows_a_power_law(dataset: Dataset) -> None:
    impressions = dataset.interactions["item_id"].value_counts()
    top = impressions.iloc[: N_ITEMS // 100].sum() / impressions.sum()

    assert top > 0.3  # the top 1% of items get far more than 1% of impressions


def test_large_sizes_generate_quickly() -> None:
    started = time.perf_counter()
    dataset = generate_synthetic(50_000, 100_000, seed=0)

    assert time.perf_counter() - started < 20  # a few seconds on a laptop; slack for busy CI
    assert len(dataset.interactions) > 1_490_000


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_synthetic(0, 10)
