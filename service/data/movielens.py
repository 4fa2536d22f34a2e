"""Loaders for the MovieLens data sets (https://grouplens.org/datasets/movielens/).

Every rating counts as a positive interaction (implicit feedback); the rating value is dropped.
The loaders return the data as read; `service.data.load.load_dataset` cleans it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID, Dataset, FeatureSpec
from service.data.generic import TableFile, parse_timestamps, read_delimited, require_files

ML100K_FILES = ("u.data", "u.user", "u.item")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
CSV_FILES = ("ratings.csv", "movies.csv")
TAGS_FILE = "tags.csv"

# u.item's 19 genre flags, in order, for a copy of ML-100K without u.genre.
STANDARD_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRE = frozenset({"unknown", "(no genres listed)"})

GENRE = "genre"
YEAR = "year"
TITLE = "title"
TAGS = "tags"
USER_FEATURES = FeatureSpec(categorical=("gender", "occupation", "zip_prefix"), numeric=("age",))
ITEM_FEATURES = FeatureSpec(multi=(GENRE,), numeric=(YEAR,))

# ML-1M stores an age bracket code; the model gets a representative age of the bracket.
ML1M_AGE_BRACKETS = {1: 15.0, 18: 21.0, 25: 29.5, 35: 39.5, 45: 47.0, 50: 52.5, 56: 60.0}
MAX_TAGS_PER_ITEM = 10
MIN_TAG_USES = 3

_LATIN1 = "latin-1"
# A year at the end of a title: "Toy Story (1995)", also a series' "(2007-2013)".
_TITLE_YEAR = r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$"
_DATE_YEAR = r"(\d{4})\s*$"


def load_ml100k(directory: Path) -> Dataset:
    """MovieLens 100K: u.data (tab), u.user and u.item (pipe, latin-1), u.genre when present."""
    require_files(directory, ML100K_FILES, "MovieLens 100K")
    genres = _ml100k_genres(directory / "u.genre")
    return Dataset(
        name="ml-100k", source=str(directory),
        interactions=_ratings(directory / "u.data", sep="\t", encoding=_LATIN1),
        users=_ml100k_users(directory / "u.user"),
        items=_ml100k_items(directory / "u.item", genres),
        user_features=USER_FEATURES, item_features=ITEM_FEATURES, has_labels=False)


def load_ml1m(directory: Path) -> Dataset:
    """MovieLens 1M: ratings.dat, users.dat and movies.dat ('::'-separated, latin-1)."""
    require_files(directory, ML1M_FILES, "MovieLens 1M")
    return Dataset(
        name="ml-1m", source=str(directory),
        interactions=_ratings(directory / "ratings.dat", sep="::", encoding=_LATIN1),
        users=_ml1m_users(directory / "users.dat"),
        items=_ml1m_items(directory / "movies.dat"),
        user_features=USER_FEATURES, item_features=ITEM_FEATURES, has_labels=False)


def load_movielens_csv(directory: Path) -> Dataset:
    """MovieLens CSV (ml-latest(-small), ml-25m, ml-32m): ratings.csv, movies.csv, tags.csv.

    No user features. With tags.csv, items get a multi feature `tags`: their most used tags.
    """
    require_files(directory, CSV_FILES, "MovieLens CSV")
    ratings = read_delimited(directory / "ratings.csv", sep=",",
                             required=("userId", "movieId", "timestamp"))
    items = _csv_movies(directory / "movies.csv")
    item_features = ITEM_FEATURES
    if (directory / TAGS_FILE).is_file():
        items[TAGS] = items[ITEM_ID].astype(str).map(item_tags(directory / TAGS_FILE))
        item_features = FeatureSpec(multi=(GENRE, TAGS), numeric=(YEAR,))
    return Dataset(
        name=directory.resolve().name, source=str(directory),
        interactions=_interactions(ratings, "userId", "movieId",
                                   TableFile(directory / "ratings.csv", 2)),
        users=pd.DataFrame({USER_ID: pd.Series(dtype=object)}), items=items,
        user_features=FeatureSpec(), item_features=item_features, has_labels=False)


def _ratings(path: Path, *, sep: str, encoding: str) -> pd.DataFrame:
    """A headerless `user item rating timestamp` file as interactions."""
    names = (USER_ID, ITEM_ID, "rating", TIMESTAMP)
    frame = read_delimited(path, sep=sep, names=names, required=names, encoding=encoding,
                           quoted=False)
    return _interactions(frame, USER_ID, ITEM_ID, TableFile(path, 1))


def _interactions(frame: pd.DataFrame, user: str, item: str, source: TableFile) -> pd.DataFrame:
    return pd.DataFrame({
        USER_ID: frame[user].to_numpy(), ITEM_ID: frame[item].to_numpy(),
        TIMESTAMP: parse_timestamps(frame[TIMESTAMP], source),
        LABEL: np.ones(len(frame), dtype=np.int8)})


def _ml100k_genres(path: Path) -> tuple[str, ...]:
    """Genre names in flag order, from u.genre (`name|index`) or the standard list."""
    if not path.is_file():
        return STANDARD_GENRES
    frame = read_delimited(path, sep="|", names=("genre", "index"), required=("genre", "index"),
                           encoding=_LATIN1, quoted=False)
    frame = frame.assign(index=pd.to_numeric(frame["index"], errors="coerce"))
    return tuple(str(name) for name in frame.sort_values("index")["genre"])


def _ml100k_users(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, sep="|", names=(USER_ID, "age", "gender", "occupation", "zip"),
                           required=(USER_ID,), str_columns=("gender", "occupation", "zip"),
                           encoding=_LATIN1, quoted=False)
    return pd.DataFrame({
        USER_ID: frame[USER_ID].to_numpy(),
        "gender": frame["gender"].to_numpy(), "occupation": frame["occupation"].to_numpy(),
        "zip_prefix": zip_prefix(frame["zip"]).to_numpy(),
        "age": pd.to_numeric(frame["age"], errors="coerce").to_numpy(dtype="float64")})


def _ml100k_items(path: Path, genres: Sequence[str]) -> pd.DataFrame:
    flags = [f"flag_{index}" for index in range(len(genres))]
    names = (ITEM_ID, TITLE, "release_date", "video_release_date", "url", *flags)
    frame = read_delimited(path, sep="|", names=names, required=(ITEM_ID,),
                           str_columns=(TITLE, "release_date"), encoding=_LATIN1, quoted=False)
    marks = frame[flags].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy() > 0
    return pd.DataFrame({
        ITEM_ID: frame[ITEM_ID].to_numpy(), TITLE: frame[TITLE].to_numpy(),
        GENRE: _flags_to_genres(marks, genres),
        YEAR: _year(frame["release_date"], _DATE_YEAR).to_numpy()})


def _flags_to_genres(marks: np.ndarray, genres: Sequence[str]) -> list[list[str]]:
    """One list of genre names per row of 0/1 flags, without the placeholder genres."""
    names = np.array(genres, dtype=object)
    kept = np.array([name not in NO_GENRE for name in genres], dtype=bool)
    return [names[kept & row].tolist() for row in marks]


def _ml1m_users(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, sep="::", names=(USER_ID, "gender", "age", "occupation", "zip"),
                           required=(USER_ID,), str_columns=("gender", "occupation", "zip"),
                           encoding=_LATIN1, quoted=False)
    codes = pd.to_numeric(frame["age"], errors="coerce")
    return pd.DataFrame({
        USER_ID: frame[USER_ID].to_numpy(),
        "gender": frame["gender"].to_numpy(), "occupation": frame["occupation"].to_numpy(),
        "zip_prefix": zip_prefix(frame["zip"]).to_numpy(),
        # An unlisted code is kept as the age itself rather than dropped.
        "age": codes.map(ML1M_AGE_BRACKETS).fillna(codes).to_numpy(dtype="float64")})


def _ml1m_items(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, sep="::", names=(ITEM_ID, TITLE, GENRE), required=(ITEM_ID,),
                           str_columns=(TITLE, GENRE), encoding=_LATIN1, quoted=False)
    return _movies(frame, ITEM_ID)


def _csv_movies(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, sep=",", required=("movieId", TITLE, "genres"),
                           str_columns=(TITLE, "genres"))
    return _movies(frame.rename(columns={"genres": GENRE}), "movieId")


def _movies(frame: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Items from a `id, title, A|B|C genres` table."""
    return pd.DataFrame({
        ITEM_ID: frame[id_column].to_numpy(), TITLE: frame[TITLE].to_numpy(),
        GENRE: split_genres(frame[GENRE]), YEAR: title_year(frame[TITLE]).to_numpy()})


def split_genres(values: pd.Series) -> list[list[str]]:
    """`A|B|C` genre strings as lists, without placeholders such as "(no genres listed)"."""
    return [[genre for genre in text.split("|") if genre and genre not in NO_GENRE]
            if isinstance(text, str) else [] for text in values]


def _year(values: pd.Series, pattern: str) -> pd.Series:
    """The four-digit year matched by `pattern`, as a float (NaN when there is none)."""
    return pd.to_numeric(values.astype("str").str.extract(pattern, expand=False),
                         errors="coerce").astype("float64")


def title_year(titles: pd.Series) -> pd.Series:
    """The release year at the end of MovieLens titles such as "Toy Story (1995)"; NaN if none."""
    return _year(titles, _TITLE_YEAR)


def zip_prefix(zips: pd.Series) -> pd.Series:
    """The first character of each zip code when it is a digit (a US region), else ""."""
    first = zips.astype("str").str.strip().str[:1]
    return first.where(first.str.isdigit().fillna(False).astype(bool), "").astype(object)


def item_tags(path: Path) -> pd.Series:
    """Each item's most used tags (lower-cased), index: item id as text, values: lists.

    Only tags used at least MIN_TAG_USES times in the whole file count; at most
    MAX_TAGS_PER_ITEM per item, the most used on that item first (ties alphabetical).
    """
    frame = read_delimited(path, sep=",", required=("movieId",), columns=("tag",),
                           str_columns=("tag",))
    tags = pd.DataFrame({"item": frame["movieId"].astype(str).to_numpy(),
                         "tag": frame["tag"].str.strip().str.lower().to_numpy()})
    tags = tags[tags["tag"].notna() & (tags["tag"] != "")]
    uses = tags["tag"].value_counts()
    tags = tags[tags["tag"].isin(uses.index[uses >= MIN_TAG_USES])]
    per_item = tags.groupby(["item", "tag"]).size().rename("uses").reset_index()
    per_item = per_item.sort_values(["item", "uses", "tag"], ascending=[True, False, True])
    top = per_item.groupby("item", sort=False).head(MAX_TAGS_PER_ITEM)
    return top.groupby("item", sort=False)["tag"].agg(list)
