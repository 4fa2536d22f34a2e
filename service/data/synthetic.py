"""A synthetic impressions data set with known click probabilities, for tests and benchmarks.

Users see items drawn by a power-law popularity; each impression is clicked with a planted
probability p = sigmoid(base + popularity bias + feature interactions), stored as
`true_probability` so a model's AUC can be compared with the oracle's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from service.data.cleaning import clean
from service.data.dataset import (
    ITEM_ID,
    LABEL,
    TIMESTAMP,
    TRUE_PROBABILITY,
    USER_ID,
    Dataset,
    FeatureSpec,
)

GENDERS = np.array(["F", "M", "X"], dtype=object)
GENDER_SHARES = (0.48, 0.48, 0.04)
COUNTRIES = np.array(["US", "GB", "DE", "FR", "IN", "BR", "JP", "CA"], dtype=object)
COUNTRY_SHARES = (0.30, 0.12, 0.11, 0.10, 0.12, 0.09, 0.08, 0.08)
CATEGORIES = np.array(["books", "electronics", "fashion", "home", "sports", "toys", "beauty",
                       "garden", "music", "games", "food", "travel"], dtype=object)
GENRES = np.array(["classic", "modern", "family", "premium", "budget", "eco", "handmade",
                   "vintage", "outdoor", "indoor", "kids", "pro", "luxury", "digital",
                   "seasonal"], dtype=object)
GENRES_PER_ITEM_SHARES = (0.5, 0.35, 0.15)  # of 1, 2 and 3 genres
AGE_RANGE = (18, 70)
AGE_GROUP_EDGES = (25, 35, 45, 55)  # 5 groups: 18-24, 25-34, 35-44, 45-54, 55-70
YEAR_RANGE = (1990, 2024)

USER_FEATURES = FeatureSpec(categorical=("gender", "country"),
                            numeric=("age", "price_sensitivity"))
ITEM_FEATURES = FeatureSpec(categorical=("category",), multi=("genre",),
                            numeric=("price", "year"))

ZIPF_EXPONENT = 1.1
TARGET_CLICK_RATE = 0.2
# Relative weights of the planted interactions. Over the impressions, their sum is rescaled to
# INTERACTION_STD and the log-popularity bias to POPULARITY_STD, so that the oracle AUC is about
# 0.78 whatever the seed and sizes.
AGE_CATEGORY_SCALE = 1.0
COUNTRY_CATEGORY_SCALE = 0.5
GENDER_GENRE_SCALE = 1.0
PRICE_WEIGHT = 1.2
INTERACTION_STD = 1.1
POPULARITY_STD = 0.5
START_TIME = 1_600_000_000  # 2020-09-13, Unix seconds
MAX_SECONDS_BETWEEN_IMPRESSIONS = 120


@dataclass(frozen=True)
class _Users:
    frame: pd.DataFrame
    age_group: np.ndarray
    gender: np.ndarray
    country: np.ndarray
    price_sensitivity: np.ndarray


@dataclass(frozen=True)
class _Items:
    frame: pd.DataFrame
    category: np.ndarray
    genre_weights: np.ndarray  # (items, genres), each row sums to 1
    price_z: np.ndarray
    popularity: np.ndarray  # impression probability, sums to 1


def generate_synthetic(n_users: int, n_items: int, seed: int = 0,
                       impressions_per_user: int = 30) -> Dataset:
    """Users, items and up to `impressions_per_user` labelled impressions per user.

    Deterministic for a seed. A user never sees the same item twice, so a user gets fewer
    impressions when the catalogue is too small or too concentrated to fill the quota.
    """
    if min(n_users, n_items, impressions_per_user) < 1:
        raise ValueError("n_users, n_items and impressions_per_user must be at least 1")
    rng = np.random.default_rng(seed)
    users = _users(rng, n_users)
    items = _items(rng, n_items)
    user_index, item_index = _impressions(rng, items.popularity, n_users, impressions_per_user)
    logits = _planted_logits(rng, users, items, user_index, item_index)
    probability = _sigmoid(logits + _calibrated_base(logits, TARGET_CLICK_RATE))
    interactions = pd.DataFrame({
        USER_ID: pd.Series(users.frame[USER_ID].to_numpy()[user_index], dtype=object),
        ITEM_ID: pd.Series(items.frame[ITEM_ID].to_numpy()[item_index], dtype=object),
        TIMESTAMP: _global_clock(rng, len(user_index)),
        LABEL: (rng.random(len(probability)) < probability).astype(np.int8),
        TRUE_PROBABILITY: probability})
    return clean(Dataset(
        name="synthetic", source=f"synthetic(users={n_users}, items={n_items}, seed={seed})",
        interactions=interactions, users=users.frame, items=items.frame,
        user_features=USER_FEATURES, item_features=ITEM_FEATURES, has_labels=True))


def _ids(prefix: str, count: int) -> pd.Series:
    return pd.Series([f"{prefix}{number}" for number in range(1, count + 1)], dtype=object)


def _users(rng: np.random.Generator, count: int) -> _Users:
    age = rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1, count)
    gender = rng.choice(len(GENDERS), count, p=GENDER_SHARES)
    country = rng.choice(len(COUNTRIES), count, p=COUNTRY_SHARES)
    price_sensitivity = rng.beta(2.0, 2.0, count)
    frame = pd.DataFrame({
        USER_ID: _ids("u", count), "gender": pd.Series(GENDERS[gender], dtype=object),
        "country": pd.Series(COUNTRIES[country], dtype=object),
        "age": age.astype("float64"), "price_sensitivity": price_sensitivity})
    return _Users(frame, np.searchsorted(AGE_GROUP_EDGES, age, side="right"), gender, country,
                  price_sensitivity)


def _items(rng: np.random.Generator, count: int) -> _Items:
    category = rng.choice(len(CATEGORIES), count, p=_zipf_shares(len(CATEGORIES), 0.6))
    genre_mask = _genre_mask(rng, count)
    log_price = rng.normal(3.0, 0.8, count)
    year = rng.integers(YEAR_RANGE[0], YEAR_RANGE[1] + 1, count)
    # Popularity ranks are shuffled so that item numbers say nothing about popularity.
    rank = rng.permutation(count) + 1
    popularity = rank.astype("float64") ** -ZIPF_EXPONENT
    frame = pd.DataFrame({
        ITEM_ID: _ids("i", count), "category": pd.Series(CATEGORIES[category], dtype=object),
        "genre": pd.Series([GENRES[row].tolist() for row in genre_mask], dtype=object),
        "price": np.round(np.exp(log_price), 2), "year": year.astype("float64"),
        "title": pd.Series([f"Item {number}" for number in range(1, count + 1)], dtype=object)})
    return _Items(frame, category, genre_mask / genre_mask.sum(axis=1, keepdims=True),
                  _standardise(log_price), popularity / popularity.sum())


def _zipf_shares(count: int, exponent: float) -> np.ndarray:
    shares = np.arange(1, count + 1, dtype="float64") ** -exponent
    return shares / shares.sum()


def _genre_mask(rng: np.random.Generator, count: int) -> np.ndarray:
    """(items, genres) booleans: 1 to 3 distinct genres per item, common genres more often."""
    # Weighted sampling without replacement: the k largest of u ** (1 / weight).
    keys = rng.random((count, len(GENRES))) ** (1.0 / _zipf_shares(len(GENRES), 0.5))
    chosen = np.argsort(-keys, axis=1)[:, :len(GENRES_PER_ITEM_SHARES)]
    wanted = rng.choice(len(GENRES_PER_ITEM_SHARES), count, p=GENRES_PER_ITEM_SHARES) + 1
    mask = np.zeros((count, len(GENRES)), dtype=bool)
    for slot in range(len(GENRES_PER_ITEM_SHARES)):
        rows = np.flatnonzero(wanted > slot)
        mask[rows, chosen[rows, slot]] = True
    return mask


def _impressions(rng: np.random.Generator, popularity: np.ndarray, n_users: int,
                 per_user: int) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item index) of each impression, users in order, no item twice per user."""
    # Draw extra items so that dropping repeats still leaves `per_user` for nearly every user.
    draws = rng.choice(len(popularity), (n_users, 2 * per_user + 10), p=popularity)
    order = np.argsort(draws, axis=1, kind="stable")
    in_order = np.take_along_axis(draws, order, axis=1)
    repeat_sorted = np.zeros_like(in_order, dtype=bool)
    repeat_sorted[:, 1:] = in_order[:, 1:] == in_order[:, :-1]
    repeat = np.empty_like(repeat_sorted)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    keep = ~repeat & (np.cumsum(~repeat, axis=1) <= per_user)
    user_index, column = np.nonzero(keep)
    return user_index, draws[user_index, column]


def _planted_logits(rng: np.random.Generator, users: _Users, items: _Items,
                    user_index: np.ndarray, item_index: np.ndarray) -> np.ndarray:
    """Each impression's logit, less the base: popularity plus the planted interactions."""
    age_category = rng.normal(0.0, AGE_CATEGORY_SCALE, (len(AGE_GROUP_EDGES) + 1,
                                                        len(CATEGORIES)))
    country_category = rng.normal(0.0, COUNTRY_CATEGORY_SCALE, (len(COUNTRIES), len(CATEGORIES)))
    gender_genre = rng.normal(0.0, GENDER_GENRE_SCALE, (len(GENDERS), len(GENRES)))
    gender_item = gender_genre @ items.genre_weights.T  # (genders, items)
    category = items.category[item_index]
    interactions = (age_category[users.age_group[user_index], category]
                    + country_category[users.country[user_index], category]
                    + gender_item[users.gender[user_index], item_index]
                    - PRICE_WEIGHT * users.price_sensitivity[user_index]
                    * items.price_z[item_index])
    return (POPULARITY_STD * _standardise(np.log(items.popularity[item_index]))
            + INTERACTION_STD * _standardise(interactions))


def _standardise(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / (spread if spread > 0 else 1.0)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _calibrated_base(logits: np.ndarray, rate: float) -> float:
    """The constant that makes the mean click probability `rate` (bisection: it is monotone)."""
    low, high = -30.0, 30.0
    for _ in range(50):
        middle = (low + high) / 2
        if _sigmoid(logits + middle).mean() < rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _global_clock(rng: np.random.Generator, count: int) -> np.ndarray:
    """Distinct int64 timestamps in a random global order: each user's are strictly increasing."""
    ticks = START_TIME + np.cumsum(rng.integers(1, MAX_SECONDS_BETWEEN_IMPRESSIONS + 1, count))
    timestamps = np.empty(count, dtype=np.int64)
    timestamps[rng.permutation(count)] = ticks
    return timestamps
