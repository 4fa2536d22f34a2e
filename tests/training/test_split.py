"""Leave-last-out split on tiny hand-checked data sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID
from service.training.split import cut_last, leave_last_out


def frame(rows: list[tuple[str, str, int, int]]) -> pd.DataFrame:
    """(user, item, timestamp, label) tuples -> an interactions table with the real dtypes."""
    users, items, times, labels = zip(*rows, strict=True)
    return pd.DataFrame({
        USER_ID: pd.Series(users, dtype=str), ITEM_ID: pd.Series(items, dtype=str),
        TIMESTAMP: np.array(times, dtype=np.int64), LABEL: np.array(labels, dtype=np.int8),
    })


def pairs(df: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(df[USER_ID], df[ITEM_ID], strict=True))


# Implicit data, three users:
#   a: 4 rows; "10" and "9" tie at t=3. Integer order makes "10" later -> test (a, 10);
#      the remaining (1,5) (2,7) (3,9) has 3 rows -> validation (a, 9); train (a,5) (a,7).
#   b: 2 rows -> too few, all train.
#   c: 3 rows, input out of time order: by time "3"(t4) "1"(t5) "2"(t6) -> test (c, 2);
#      2 rows remain -> no validation; train (c,3) (c,1).
IMPLICIT = frame([
    ("a", "5", 1, 1), ("a", "10", 3, 1), ("a", "9", 3, 1), ("a", "7", 2, 1),
    ("b", "1", 1, 1), ("b", "2", 2, 1),
    ("c", "1", 5, 1), ("c", "2", 6, 1), ("c", "3", 4, 1),
])


def test_implicit_split_by_hand() -> None:
    split = leave_last_out(IMPLICIT)
    assert pairs(split.test) == {("a", "10"), ("c", "2")}
    assert pairs(split.validation) == {("a", "9")}
    assert pairs(split.train) == {("a", "5"), ("a", "7"), ("b", "1"), ("b", "2"),
                                  ("c", "3"), ("c", "1")}
    assert split.test_items.to_dict("list") == {
        USER_ID: ["a", "c"], ITEM_ID: ["10", "2"], TIMESTAMP: [3, 6]}
    assert split.validation_items.to_dict("list") == {
        USER_ID: ["a"], ITEM_ID: ["9"], TIMESTAMP: [3]}


def test_parts_partition_the_input_and_keep_columns_and_order() -> None:
    split = leave_last_out(IMPLICIT)
    parts = [split.train, split.validation, split.test]
    assert sum(len(part) for part in parts) == len(IMPLICIT)
    for part in parts:
        assert list(part.columns) == list(IMPLICIT.columns)
        assert list(part.index) == list(range(len(part)))
    # Input order kept: a's training rows appear as in the input (5 before 7).
    assert list(split.train[ITEM_ID][split.train[USER_ID] == "a"]) == ["5", "7"]


def test_string_item_ids_tie_break_by_string_order() -> None:
    # "b10" is not an integer, so ids compare as strings: "b9" > "b10" -> "b9" is later.
    df = frame([("u", "b1", 1, 1), ("u", "b10", 2, 1), ("u", "b9", 2, 1)])
    assert pairs(cut_last(df).block) == {("u", "b9")}


def test_integer_ids_compare_numerically_not_as_strings() -> None:
    # As strings "9" > "10"; as integers 10 > 9, so "10" is the later one.
    df = frame([("u", "1", 1, 1), ("u", "9", 2, 1), ("u", "10", 2, 1)])
    assert pairs(cut_last(df).block) == {("u", "10")}


def test_result_does_not_depend_on_input_row_order() -> None:
    shuffled = IMPLICIT.sample(frac=1.0, random_state=3).reset_index(drop=True)
    a, b = leave_last_out(IMPLICIT), leave_last_out(shuffled)
    for part in ("train", "validation", "test"):
        assert pairs(getattr(a, part)) == pairs(getattr(b, part))
    pd.testing.assert_frame_equal(a.test_items, b.test_items)


# Labelled data, fraction 0.2:
#   p: 6 rows t=1..6 with labels 1 1 0 1 1 0. Test block = last ceil(0.2*6)=2 rows (t5 label 1,
#      t6 label 0); the ranking target is the last positive in it: (p, i5).
#      The remaining 4 rows give a validation block of ceil(0.2*4)=1 row: (p, i4), a positive.
#   q: 5 rows with labels 1 1 1 0 0. Test block = ceil(0.2*5)=1 row, (q, j5) label 0 -> a
#      pointwise test row but no ranking target. Validation: ceil(0.2*4)=1 row (q, j4), label 0
#      -> no validation target either.
#   r: 2 rows -> train only.
LABELLED = frame(
    [("p", f"i{t}", t, label) for t, label in zip(range(1, 7), [1, 1, 0, 1, 1, 0], strict=True)]
    + [("q", f"j{t}", t, label) for t, label in zip(range(1, 6), [1, 1, 1, 0, 0], strict=True)]
    + [("r", "k1", 1, 0), ("r", "k2", 2, 1)]
)


def test_labelled_fraction_block_and_last_positive_target() -> None:
    split = leave_last_out(LABELLED, holdout_fraction=0.2)
    assert pairs(split.test) == {("p", "i5"), ("p", "i6"), ("q", "j5")}
    assert split.test_items[[USER_ID, ITEM_ID]].values.tolist() == [["p", "i5"]]
    assert pairs(split.validation) == {("p", "i4"), ("q", "j4")}
    assert split.validation_items[[USER_ID, ITEM_ID]].values.tolist() == [["p", "i4"]]
    assert pairs(split.train) == {("p", "i1"), ("p", "i2"), ("p", "i3"), ("q", "j1"),
                                  ("q", "j2"), ("q", "j3"), ("r", "k1"), ("r", "k2")}


@pytest.mark.parametrize(("n_rows", "fraction", "block"), [
    (10, 0.7, 7),   # 0.7 * 10 = 7.000000000000001 in floats; must not round up to 8
    (5, 0.2, 1),    # ceil(1.0) = 1
    (6, 0.2, 2),    # ceil(1.2) = 2
    (3, 0.5, 2),    # ceil(1.5) = 2 = n - 1
    (3, 0.9, 2),    # ceil(2.7) = 3, capped at n - 1 so the user keeps a training row
    (3, 0.0, 1),    # fraction 0 -> the last row only
    (2, 0.5, 0),    # fewer than 3 rows -> no holdout
])
def test_block_size(n_rows: int, fraction: float, block: int) -> None:
    df = frame([("u", str(t), t, 1) for t in range(n_rows)])
    held = cut_last(df, fraction).block
    assert sorted(held[TIMESTAMP]) == list(range(n_rows - block, n_rows))


def test_table_without_labels_counts_rows_as_positive() -> None:
    df = IMPLICIT.drop(columns=[LABEL])
    assert cut_last(df).targets[ITEM_ID].tolist() == ["10", "2"]


def test_rejects_fraction_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="holdout_fraction"):
        cut_last(IMPLICIT, 1.0)


def test_empty_input() -> None:
    split = leave_last_out(IMPLICIT.iloc[:0])
    assert len(split.train) == len(split.test) == len(split.test_items) == 0
