"""Generic data layout: bring your own interactions and, optionally, user and item features.

A directory holding:

``interactions.csv`` or ``interactions.parquet`` (required, exactly one of them)
    One row per interaction, with columns

    - ``user_id`` (required): any string; surrounding spaces are stripped.
    - ``item_id`` (required): any string; surrounding spaces are stripped.
    - ``timestamp`` (optional): Unix seconds (integer) or an ISO 8601 date/time. When the column is
      absent, the row order is the time order.
    - ``label`` (optional): ``1`` (the user engaged) or ``0`` (the item was shown and ignored: an
      explicit negative). When the column is absent every row is a positive (implicit feedback).

    Other columns are ignored. Rows without a user id or item id are dropped. Repeated (user, item)
    pairs are collapsed to one row: the highest label, at the earliest time it was given.

``users.csv`` or ``users.parquet`` (optional)
    ``user_id`` plus one column per user feature.

``items.csv`` or ``items.parquet`` (optional)
    ``item_id`` plus one column per item feature.

Feature kinds are inferred from each column:

- a numeric column (integers, floats, booleans) is a **numeric** feature (an empty cell is missing
  and imputed by the model);
- a Parquet list column is a **multi-valued** feature (e.g. genres or tags);
- a CSV text column in which any value contains ``|`` is a **multi-valued** feature, split on ``|``
  (``Comedy|Drama``);
- any other text column is a **categorical** feature (an empty cell and values unseen in training
  share the model's unknown bucket);
- a column named ``title`` or ``name`` is display-only: returned with items, never a feature.

CSV files are UTF-8 with a header row; fields holding commas are double-quoted. Users and items
without a feature row are still used, with all their features missing; feature rows of users who
have no interaction are dropped.

Example ``items.csv``::

    item_id,title,category,genres,price
    42,Blue Kettle,kitchen,home|gift,19.90
    43,Trail Shoes,sport,outdoor,79.00
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas.api.types import is_datetime64_any_dtype, is_numeric_dtype

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID, Dataset, FeatureSpec
from service.data.errors import DataError

INTERACTIONS = "interactions"
USERS = "users"
ITEMS = "items"
# Columns shown to people but never fed to the model.
DISPLAY_COLUMNS = frozenset({"title", "name"})

_SEPARATOR_NAMES = {"\t": "tab", "|": "pipe", ",": "comma", "::": "'::'"}
_PARSER_LINE = re.compile(r"line (\d+)")
_PARSER_COUNTS = re.compile(r"Expected (\d+) fields in line \d+, saw (\d+)")
# Stands in for a multi-character separator so the fast C parser can read the file.
_UNIT_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class TableFile:
    """Where the rows of a loaded table came from, to point errors at the right line or row."""

    path: Path
    # File line number of row 0 for text files; None for Parquet, whose rows have no line.
    first_line: int | None

    def error(self, message: str, row: int | None = None) -> DataError:
        """A DataError naming this file and the line (text) or 1-based row (Parquet) of `row`."""
        if row is None:
            return DataError(message, file=self.path)
        if self.first_line is None:
            return DataError(f"row {row + 1}: {message}", file=self.path)
        return DataError(message, file=self.path, line=self.first_line + row)


def require_files(directory: Path, names: Sequence[str], layout: str) -> None:
    """Raise a DataError naming every file of `names` missing from `directory`."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory}: the {layout} layout needs {', '.join(names)}; "
                        f"missing {', '.join(missing)}")


def read_delimited(path: Path, *, sep: str, names: Sequence[str] | None = None,
                   required: Sequence[str] = (), columns: Sequence[str] = (),
                   str_columns: Sequence[str] = (),
                   encoding: str = "utf-8", quoted: bool = True) -> pd.DataFrame:
    """Read a delimited text file with pandas' C parser, turning every defect into a DataError.

    names: the columns of a headerless file; None when the first line is a header.
    required: columns that must exist and be non-empty on every row.
    columns: further columns that must exist (their cells may be empty).
    str_columns: columns kept as text (ids with leading zeros); the rest are inferred.
    Blank lines are skipped; a line with too many or too few fields is an error naming its line.
    """
    source = TableFile(path, 1 if names is not None else 2)
    frame = _parse(path, sep=sep, names=names, str_columns=str_columns, encoding=encoding,
                   quoted=quoted)
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas reads a first row with one field too many as "the first column is the index".
        raise _first_long_line(source, sep, len(frame.columns), encoding, quoted)
    missing = [column for column in (*required, *columns) if column not in frame.columns]
    if missing:
        raise source.error(f"missing column {', '.join(missing)}; "
                           f"found {', '.join(map(str, frame.columns))}")
    frame = frame.loc[~frame.isna().all(axis=1)]
    _check_short_rows(frame, source, sep=sep, required=required, encoding=encoding, quoted=quoted)
    return frame


def _parse(path: Path, *, sep: str, names: Sequence[str] | None, str_columns: Sequence[str],
           encoding: str, quoted: bool) -> pd.DataFrame:
    buffer: Path | io.BytesIO = path
    if len(sep) > 1:
        # The C parser only takes one-character separators; the python engine is far slower.
        buffer = io.BytesIO(path.read_bytes().replace(sep.encode(encoding),
                                                      _UNIT_SEPARATOR.encode(encoding)))
    try:
        return pd.read_csv(
            buffer, sep=_UNIT_SEPARATOR if len(sep) > 1 else sep, engine="c",
            header=None if names is not None else 0,
            names=list(names) if names is not None else None,
            dtype=dict.fromkeys(str_columns, str), encoding=encoding,
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
            skip_blank_lines=False, low_memory=False)
    except pd.errors.EmptyDataError as error:
        raise DataError("the file is empty", file=path) from error
    except pd.errors.ParserError as error:
        raise _parser_error(path, sep, str(error)) from error
    except UnicodeDecodeError as error:
        raise DataError(f"not valid {encoding} text ({error.reason} at byte {error.start})",
                        file=path) from error


def _parser_error(path: Path, sep: str, message: str) -> DataError:
    line = _PARSER_LINE.search(message)
    counts = _PARSER_COUNTS.search(message)
    if counts is not None:
        detail = f"expected {counts.group(1)} {_separator_name(sep)}-separated fields, " \
                 f"got {counts.group(2)}"
    else:
        detail = f"cannot parse: {message.strip()}"
    return DataError(detail, file=path, line=int(line.group(1)) if line else None)


def _separator_name(sep: str) -> str:
    return _SEPARATOR_NAMES.get(sep, repr(sep))


def _check_short_rows(frame: pd.DataFrame, source: TableFile, *, sep: str,
                      required: Sequence[str], encoding: str, quoted: bool) -> None:
    """Reject rows that lack fields: the C parser pads a short line with NaN instead of failing."""
    if frame.empty:
        return
    # A short line leaves its last field empty, so only rows empty there or in a required
    # column need their raw line looked at.
    suspect_columns = list(dict.fromkeys([*required, frame.columns[-1]]))
    blank = frame[suspect_columns].isna()
    suspects = frame.index[blank.any(axis=1)]
    if len(suspects) == 0:
        return
    assert source.first_line is not None
    lines = _read_lines(source.path, [source.first_line + int(row) for row in suspects],
                        encoding)
    for row in suspects:
        line = source.first_line + int(row)
        fields = _count_fields(lines.get(line, ""), sep, quoted)
        if fields != len(frame.columns):
            raise source.error(f"expected {len(frame.columns)} {_separator_name(sep)}-separated "
                               f"fields, got {fields}", int(row))
        empty = [column for column in required if blank.at[row, column]]
        if empty:
            raise source.error(f"empty {', '.join(empty)}", int(row))


def _first_long_line(source: TableFile, sep: str, expected: int, encoding: str,
                     quoted: bool) -> DataError:
    assert source.first_line is not None
    with source.path.open(encoding=encoding, errors="replace", newline="") as handle:
        lines = itertools.islice(handle, source.first_line - 1, None)
        for row, text in enumerate(lines):
            fields = _count_fields(text.rstrip("\r\n"), sep, quoted)
            if fields > expected:
                return source.error(f"expected {expected} {_separator_name(sep)}-separated "
                                    f"fields, got {fields}", row)
    return source.error(f"expected {expected} {_separator_name(sep)}-separated fields")


def _read_lines(path: Path, numbers: Sequence[int], encoding: str) -> dict[int, str]:
    """The text of the given 1-based lines, in one pass that stops at the last one needed."""
    wanted = set(numbers)
    with path.open(encoding=encoding, errors="replace", newline="") as handle:
        numbered = enumerate(itertools.islice(handle, max(wanted)), start=1)
        return {number: text.rstrip("\r\n") for number, text in numbered if number in wanted}


def _count_fields(line: str, sep: str, quoted: bool) -> int:
    if quoted and len(sep) == 1:
        return len(next(csv.reader([line], delimiter=sep), []))
    return line.count(sep) + 1


def read_parquet(path: Path) -> tuple[pd.DataFrame, frozenset[str]]:
    """A Parquet file as a frame, plus the names of its list-typed columns."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"not a readable Parquet file ({error})", file=path) from error
    lists = frozenset(field.name for field in table.schema
                      if pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
                      or pa.types.is_fixed_size_list(field.type))
    return table.to_pandas(), lists


def infer_features(frame: pd.DataFrame, id_column: str, *,
                   list_columns: frozenset[str] = frozenset(), split_pipes: bool = False,
                   ) -> tuple[pd.DataFrame, FeatureSpec]:
    """Classify every non-id column as a feature kind, splitting `|`-joined text when asked.

    Returns the frame (multi columns split into lists) and the spec, which leaves out the id
    and display-only columns.
    """
    frame = frame.copy()
    categorical: list[str] = []
    multi: list[str] = []
    numeric: list[str] = []
    for column in frame.columns:
        series = frame[column]
        if column == id_column or str(column).lower() in DISPLAY_COLUMNS:
            continue
        if column in list_columns:
            multi.append(column)
        elif is_numeric_dtype(series):  # booleans included: they are 0/1 numbers
            numeric.append(column)
        elif split_pipes and _has_pipes(series):
            frame[column] = series.str.split("|")
            multi.append(column)
        else:
            categorical.append(column)
    return frame, FeatureSpec(tuple(categorical), tuple(multi), tuple(numeric))


def _has_pipes(series: pd.Series) -> bool:
    if is_numeric_dtype(series) or is_datetime64_any_dtype(series):
        return False
    return bool(series.dropna().astype(str).str.contains("|", regex=False).any())


def load_generic(directory: Path) -> Dataset:
    """Load the generic layout described in this module's docstring (not yet cleaned)."""
    interactions_path = _one_of(directory, INTERACTIONS, required=True)
    assert interactions_path is not None
    interactions, source, _ = _read_table(interactions_path, (USER_ID, ITEM_ID))
    has_time = TIMESTAMP in interactions.columns
    interactions = _interaction_columns(interactions, source)
    users, user_features = _feature_table(directory, USERS, USER_ID)
    items, item_features = _feature_table(directory, ITEMS, ITEM_ID)
    return Dataset(
        name=directory.resolve().name, source=str(directory), interactions=interactions,
        users=users, items=items, user_features=user_features, item_features=item_features,
        has_labels=bool((interactions[LABEL] == 0).any()), has_time=has_time)


def _one_of(directory: Path, stem: str, *, required: bool) -> Path | None:
    found = [directory / f"{stem}.{ext}" for ext in ("csv", "parquet")
             if (directory / f"{stem}.{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{directory}: both {stem}.csv and {stem}.parquet exist; keep one")
    if not found and required:
        raise DataError(f"{directory}: the generic layout needs {stem}.csv or {stem}.parquet")
    return found[0] if found else None


def _read_table(path: Path, id_columns: Sequence[str]
                ) -> tuple[pd.DataFrame, TableFile, frozenset[str]]:
    """Read a CSV or Parquet table, ids as text: the frame, its source and its list columns.

    The index of a CSV frame keeps the row positions of the file (blank lines leave gaps), which
    TableFile turns back into line numbers.
    """
    if path.suffix == ".parquet":
        frame, lists = read_parquet(path)
        # A frame saved by pandas may come back with its index restored: make it a column again
        # (when named) so that row labels are positions for error messages.
        frame = frame.reset_index(drop=all(name is None for name in frame.index.names))
        source = TableFile(path, None)
    else:
        frame = read_delimited(path, sep=",", str_columns=id_columns)
        lists = frozenset()
        source = TableFile(path, 2)
    for column in id_columns:
        if column not in frame.columns:
            raise source.error(f"missing column {column}; "
                               f"found {', '.join(map(str, frame.columns))}")
    return frame, source, lists


def _interaction_columns(frame: pd.DataFrame, source: TableFile) -> pd.DataFrame:
    """user_id, item_id, timestamp (int64 seconds) and label (0/1) of every row."""
    timestamps = (parse_timestamps(frame[TIMESTAMP], source) if TIMESTAMP in frame.columns
                  else np.arange(len(frame), dtype=np.int64))
    labels = (parse_labels(frame[LABEL], source) if LABEL in frame.columns
              else np.ones(len(frame), dtype=np.int8))
    return pd.DataFrame({USER_ID: frame[USER_ID].to_numpy(), ITEM_ID: frame[ITEM_ID].to_numpy(),
                         TIMESTAMP: timestamps, LABEL: labels})


def parse_timestamps(series: pd.Series, source: TableFile) -> np.ndarray:
    """Unix seconds (int64) from numbers or ISO 8601 dates; a bad or missing value is an error."""
    if is_datetime64_any_dtype(series):
        parsed = _datetime_seconds(series)
    elif is_numeric_dtype(series):
        parsed = series.astype("float64")
    else:
        numbers = pd.to_numeric(series, errors="coerce")
        # Any number means the column holds Unix seconds; its non-numbers are then the errors.
        parsed = numbers if numbers.notna().any() else _datetime_seconds(
            pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601"))
    bad = series.index[parsed.isna().to_numpy()]
    if len(bad):
        value = series.loc[bad[0]]
        detail = "missing timestamp" if series.isna().loc[bad[0]] else \
            f"timestamp {_shown(value)} is neither Unix seconds nor an ISO 8601 date"
        raise source.error(detail, int(bad[0]))
    return np.floor(parsed.to_numpy(dtype="float64")).astype(np.int64)


def _shown(value: object) -> str:
    """A cell value as a person wrote it: 2 rather than np.float64(2.0), text quoted."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _datetime_seconds(series: pd.Series) -> pd.Series:
    if series.dt.tz is None:
        series = series.dt.tz_localize("UTC")
    return (series - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def parse_labels(series: pd.Series, source: TableFile) -> np.ndarray:
    """0/1 labels as int8; anything else (including a missing label) is an error."""
    numbers = pd.to_numeric(series, errors="coerce").astype("float64")
    bad = series.index[~numbers.isin([0.0, 1.0]).to_numpy()]
    if len(bad):
        value = series.loc[bad[0]]
        detail = "missing label" if series.isna().loc[bad[0]] else \
            f"label must be 0 or 1, got {_shown(value)}"
        raise source.error(detail, int(bad[0]))
    return numbers.to_numpy().astype(np.int8)


def _feature_table(directory: Path, stem: str, id_column: str) -> tuple[pd.DataFrame, FeatureSpec]:
    path = _one_of(directory, stem, required=False)
    if path is None:
        return pd.DataFrame({id_column: pd.Series(dtype=object)}), FeatureSpec()
    frame, _, lists = _read_table(path, (id_column,))
    # Only CSV joins several values into one text cell; Parquet has real lists for that.
    return infer_features(frame, id_column, list_columns=lists,
                          split_pipes=path.suffix != ".parquet")
