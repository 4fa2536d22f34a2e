"""MovieLens loaders on small hand-written copies of each layout, and on ML-100K when present."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from service.data.errors import DataError
from service.data.movielens import (
    STANDARD_GENRES,
    item_tags,
    load_ml1m,
    load_ml100k,
    load_movielens_csv,
    split_genres,
    title_year,
    zip_prefix,
)


def ml100k_path() -> Path:
    """The real ML-100K (not part of the repository: its licence forbids copying it)."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"
    return Path(os.environ.get("RECSYS_ML100K", default))


def _flags(*genres: str) -> str:
    return "|".join("1" if name in genres else "0" for name in STANDARD_GENRES)


def write_ml100k(directory: Path, *, genre_file: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n"
                                      "2\t10\t4\t881250951\n")
    (directory / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    (directory / "u.item").write_bytes(
        f"10|Café Society (1995)|01-Jan-1995||http://x|{_flags('Comedy', 'Drama')}\n"
        f"20|unknown||||{_flags('unknown')}\n"
        f'30|"Crumb": A Life (1994)|01-Jan-1994||http://x|{_flags("Documentary")}\n'
        .encode("latin-1"))
    if genre_file:
        (directory / "u.genre").write_text(
            "".join(f"{name}|{index}\n" for index, name in enumerate(STANDARD_GENRES)) + "\n")
    return directory


def write_ml1m(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.dat").write_text("1::10::5::978300760\n2::10::3::978302109\n"
                                           "2::30::4::978301968\n")
    (directory / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072-1234\n")
    (directory / "movies.dat").write_bytes(
        "10::Misérables, Les (1995)::Drama|Musical\n30::Untitled::Comedy\n"
        '40::Star Wars: "Episode IV" (1977)::Sci-Fi\n'.encode("latin-1"))
    return directory


def write_movielens_csv(directory: Path, *, tags: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,2,3.5,964981247\r\n"
        b"2,2,5.0,964982224\r\n")
    (directory / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Babylon 5 (1994-1998),(no genres listed)\n"
        "3,No Year Here,Documentary\n")
    if tags is not None:
        (directory / "tags.csv").write_text(tags)
    return directory


def test_ml100k_reads_every_file(tmp_path: Path) -> None:
    dataset = load_ml100k(write_ml100k(tmp_path))

    assert len(dataset.interactions) == 3
    assert dataset.interactions["timestamp"].tolist() == [881250949, 881250950, 881250951]
    assert (dataset.interactions["label"] == 1).all()
    assert not dataset.has_labels
    users = dataset.users.set_index("user_id")
    assert users.loc[1, "age"] == 24.0
    assert users.loc[1, "zip_prefix"] == "8"
    assert users.loc[2, "zip_prefix"] == ""  # a Canadian postcode has no US region digit
    assert dataset.user_features.categorical == ("gender", "occupation", "zip_prefix")
    assert dataset.user_features.numeric == ("age",)
    items = dataset.items.set_index("item_id")
    assert items.loc[10, "title"] == "Café Society (1995)"
    assert items.loc[10, "genre"] == ["Comedy", "Drama"]
    assert items.loc[10, "year"] == 1995.0
    assert items.loc[20, "genre"] == []  # "unknown" is a placeholder, not a genre
    assert items.loc[30, "title"] == '"Crumb": A Life (1994)'  # quotes are plain text here
    assert math.isnan(items.loc[20, "year"])
    assert dataset.item_features.multi == ("genre",)
    assert "title" not in dataset.item_features.names


def test_ml100k_without_u_genre_uses_the_standard_genres(tmp_path: Path) -> None:
    dataset = load_ml100k(write_ml100k(tmp_path, genre_file=False))

    assert dataset.items.set_index("item_id").loc[10, "genre"] == ["Comedy", "Drama"]


@pytest.mark.parametrize(("line", "got"), [("3\t10\t4", 3), ("3\t10\t4\t881250951\t9", 5)])
def test_ml100k_malformed_line_names_file_and_line(tmp_path: Path, line: str, got: int) -> None:
    directory = write_ml100k(tmp_path)
    (directory / "u.data").write_text(f"1\t10\t5\t881250949\n\n{line}\n2\t10\t4\t881250951\n")

    with pytest.raises(DataError, match=rf"u\.data line 3: expected 4 tab-separated fields, "
                                        rf"got {got}") as caught:
        load_ml100k(directory)
    assert caught.value.file == "u.data"
    assert caught.value.line == 3


def test_ml100k_non_numeric_timestamp_names_its_line(tmp_path: Path) -> None:
    directory = write_ml100k(tmp_path)
    (directory / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t4\tyesterday\n")

    with pytest.raises(DataError, match=r"u\.data line 2: timestamp 'yesterday'"):
        load_ml100k(directory)


def test_ml100k_missing_file_is_named(tmp_path: Path) -> None:
    directory = write_ml100k(tmp_path)
    (directory / "u.item").unlink()

    with pytest.raises(DataError, match=r"MovieLens 100K layout needs .*; missing u\.item"):
        load_ml100k(directory)


def test_ml1m_reads_every_file(tmp_path: Path) -> None:
    dataset = load_ml1m(write_ml1m(tmp_path))

    assert len(dataset.interactions) == 3
    users = dataset.users.set_index("user_id")
    assert users.loc[1, "age"] == 15.0  # code 1 means "under 18"
    assert users.loc[2, "age"] == 60.0  # code 56 means "56+"
    assert users.loc[1, "occupation"] == "10"
    assert users.loc[2, "zip_prefix"] == "7"
    assert users.loc[1, "gender"] == "F"
    items = dataset.items.set_index("item_id")
    assert items.loc[10, "title"] == "Misérables, Les (1995)"
    assert items.loc[10, "genre"] == ["Drama", "Musical"]
    assert items.loc[10, "year"] == 1995.0
    assert math.isnan(items.loc[30, "year"])
    assert items.loc[40, "title"] == 'Star Wars: "Episode IV" (1977)'
    assert items.loc[40, "year"] == 1977.0


def test_ml1m_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    directory = write_ml1m(tmp_path)
    (directory / "ratings.dat").write_text("1::10::5::978300760\n2::10::3\n")

    with pytest.raises(DataError, match=r"ratings\.dat line 2: expected 4 '::'-separated fields, "
                                        r"got 3"):
        load_ml1m(directory)


def test_movielens_csv_reads_crlf_ratings_and_quoted_titles(tmp_path: Path) -> None:
    dataset = load_movielens_csv(write_movielens_csv(tmp_path))

    assert dataset.interactions["timestamp"].tolist() == [964982703, 964981247, 964982224]
    assert dataset.users.columns.tolist() == ["user_id"]
    assert dataset.user_features.names == ()
    items = dataset.items.set_index("item_id")
    assert items.loc[1, "title"] == "American President, The (1995)"
    assert items.loc[1, "genre"] == ["Comedy", "Drama", "Romance"]
    assert items.loc[2, "genre"] == []
    assert items.loc[2, "year"] == 1994.0
    assert math.isnan(items.loc[3, "year"])
    assert "tags" not in dataset.items.columns


def test_movielens_csv_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    directory = write_movielens_csv(tmp_path)
    (directory / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\r\n1,1,4.0,9\r\n"
                                            b"1,2,3.5\r\n")

    with pytest.raises(DataError, match=r"ratings\.csv line 3: expected 4 comma-separated fields"):
        load_movielens_csv(directory)


def test_movielens_csv_missing_column_is_named(tmp_path: Path) -> None:
    directory = write_movielens_csv(tmp_path)
    (directory / "movies.csv").write_text("movieId,title\n1,Heat (1995)\n")

    with pytest.raises(DataError, match=r"movies\.csv: missing column genres"):
        load_movielens_csv(directory)


def test_movielens_csv_without_movies_csv_fails(tmp_path: Path) -> None:
    directory = write_movielens_csv(tmp_path)
    (directory / "movies.csv").unlink()

    with pytest.raises(DataError, match=r"missing movies\.csv"):
        load_movielens_csv(directory)


def test_tags_keep_frequent_lower_cased_tags_most_used_first(tmp_path: Path) -> None:
    rows = (["1,1,Funny,1"] * 2 + ["2,1,funny ,2"] + ["1,1,dark,3"] * 4 + ["1,2,Dark,4"]
            + ["1,1,rare,5"] * 2 + ["1,2,,6"])
    tags = "userId,movieId,tag,timestamp\n" + "\n".join(rows) + "\n"
    dataset = load_movielens_csv(write_movielens_csv(tmp_path, tags=tags))

    items = dataset.items.set_index("item_id")
    assert items.loc[1, "tags"] == ["dark", "funny"]  # "rare" is used only twice overall
    assert items.loc[2, "tags"] == ["dark"]
    assert pd.isna(items.loc[3, "tags"])  # cleaning turns a missing list into []
    assert dataset.item_features.multi == ("genre", "tags")


def test_tags_are_capped_per_item(tmp_path: Path) -> None:
    rows = [f"1,1,tag{number:02d},1" for number in range(12) for _ in range(3 + number)]
    path = tmp_path / "tags.csv"
    path.write_text("userId,movieId,tag,timestamp\n" + "\n".join(rows) + "\n")

    top = item_tags(path)

    assert top["1"] == [f"tag{number:02d}" for number in range(11, 1, -1)]


def test_title_year_and_genre_and_zip_helpers() -> None:
    titles = pd.Series(["Heat (1995)", "Show (2007-2013)", "Untitled", "Odd (1995) ", None])
    assert title_year(titles).tolist()[:2] == [1995.0, 2007.0]
    assert math.isnan(title_year(titles)[2]) and title_year(titles)[3] == 1995.0
    assert split_genres(pd.Series(["A|B", "(no genres listed)", None])) == [["A", "B"], [], []]
    assert zip_prefix(pd.Series(["55455", "V3N4P", "", None])).tolist() == ["5", "", "", ""]


def test_real_ml100k_sizes_before_cleaning() -> None:
    path = ml100k_path()
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (set RECSYS_ML100K to its folder)")

    dataset = load_ml100k(path)

    assert len(dataset.interactions) == 100_000
    assert len(dataset.users) == 943
    assert len(dataset.items) == 1682
    assert set(dataset.items["genre"].explode().dropna()) <= set(STANDARD_GENRES) - {"unknown"}
