"""Leave-last-out evaluation split by time.

Conventions (the protocol every model is scored under):

* Per user, rows are ordered by (timestamp, item id). Item ids compare as integers when every
  item id in the data parses as an integer, else as strings; so on equal timestamps the larger
  item id counts as later. Exact duplicate (user, timestamp, item) rows keep their input order.
* A user's holdout block is their last ``max(1, ceil(holdout_fraction * n_rows))`` rows
  (fraction 0, the implicit-data setting, holds out the last row only). The block never takes
  a user's whole history: it is capped at ``n_rows - 1``.
* Users with fewer than 3 rows stay entirely in the remaining (training) part.
* The block's rows are the pointwise test set; the user's ranking target is the LAST positive
  (label 1) row inside the block. Users whose block has no positive have no ranking target.
* Validation is cut from the remaining training part by the same rule, so it never sees test
  rows and the test never leaks into early stopping.

Every returned frame keeps the input columns and input row order, with a fresh RangeIndex.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID

MIN_ROWS_FOR_HOLDOUT = 3
TARGET_COLUMNS = [USER_ID, ITEM_ID, TIMESTAMP]
# Absorbs float error in fraction * n (e.g. 0.7 * 10 = 7.000000000000001 must give 7, not 8).
_CEIL_TOLERANCE = 1e-9


@dataclass
class Holdout:
    """One leave-last-out cut of an interaction table.

    rest: rows outside every holdout block.
    block: the holdout blocks' rows (pointwise evaluation set).
    targets: one row per user with a positive in their block: user_id, item_id, timestamp of
        the last positive in the block; sorted by user_id.
    """

    rest: pd.DataFrame
    block: pd.DataFrame
    targets: pd.DataFrame


@dataclass
class Split:
    """Train / validation / test parts of a leave-last-out split.

    train: rows used to fit the model.
    validation: pointwise rows of the validation blocks (cut from train + validation).
    validation_items: ranking target per validation user (user_id, item_id, timestamp).
    test: pointwise rows of the test blocks.
    test_items: ranking target per test user (user_id, item_id, timestamp).
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    test_items: pd.DataFrame
    validation_items: pd.DataFrame


def leave_last_out(interactions: pd.DataFrame, holdout_fraction: float = 0.0) -> Split:
    """Split into train / validation / test by the protocol in the module docstring.

    holdout_fraction: 0 for implicit data (last row only); labelled data uses 0.2.
    """
    test_cut = cut_last(interactions, holdout_fraction)
    validation_cut = cut_last(test_cut.rest, holdout_fraction)
    return Split(train=validation_cut.rest, validation=validation_cut.block,
                 test=test_cut.block, test_items=test_cut.targets,
                 validation_items=validation_cut.targets)


def cut_last(interactions: pd.DataFrame, holdout_fraction: float = 0.0) -> Holdout:
    """Cut every eligible user's holdout block off the end of their time-ordered history."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    user_codes = pd.factorize(interactions[USER_ID], sort=True)[0]
    order = _time_order(user_codes, interactions)
    sorted_users = user_codes[order]
    from_end = _positions_from_end(sorted_users)
    block_sizes = _block_sizes(np.bincount(sorted_users), holdout_fraction)
    in_block_sorted = from_end < block_sizes[sorted_users]
    in_block = np.empty(len(order), dtype=bool)
    in_block[order] = in_block_sorted
    targets = _last_positive_per_user(interactions, order[in_block_sorted])
    return Holdout(rest=_rows(interactions, ~in_block), block=_rows(interactions, in_block),
                   targets=targets)


def sort_by_time(interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by user, each user's in the protocol's time order (the order histories
    grow in, so that a history's last item is the one the split calls the latest)."""
    user_codes, _ = pd.factorize(interactions[USER_ID])
    return interactions.iloc[_time_order(user_codes, interactions)]


def _time_order(user_codes: NDArray[np.intp], interactions: pd.DataFrame) -> NDArray[np.intp]:
    """Row order grouped by user, then by (timestamp, item id), then input position."""
    timestamps = interactions[TIMESTAMP].to_numpy(dtype=np.int64)
    item_ranks = _item_sort_ranks(interactions[ITEM_ID])
    # lexsort is stable and sorts by the last key first.
    return np.lexsort((item_ranks, timestamps, user_codes)).astype(np.intp)


def _item_sort_ranks(item_ids: pd.Series) -> NDArray[np.int64]:
    """Each row's item rank under integer order if all ids parse as integers, else string order."""
    codes, uniques = pd.factorize(item_ids)
    values = np.asarray(uniques, dtype=object)
    try:
        keys = np.array([int(value) for value in values], dtype=object)
    except (TypeError, ValueError):
        keys = np.array([str(value) for value in values], dtype=object)
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[np.argsort(keys, kind="stable")] = np.arange(len(keys))
    return ranks[codes]


def _positions_from_end(sorted_groups: NDArray[np.intp]) -> NDArray[np.int64]:
    """For group codes sorted ascending: 0 for each group's last row, 1 for the one before, ..."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = sorted_groups[1:] != sorted_groups[:-1]
    last_index = np.flatnonzero(is_last)
    group_end = np.repeat(last_index, np.diff(np.concatenate(([-1], last_index))))
    return (group_end - np.arange(n)).astype(np.int64)


def _block_sizes(counts: NDArray[np.int64], holdout_fraction: float) -> NDArray[np.int64]:
    """Holdout block size per user: max(1, ceil(f * n)) capped at n - 1; 0 below 3 rows."""
    raw = np.ceil(holdout_fraction * counts - _CEIL_TOLERANCE).astype(np.int64)
    sizes = np.minimum(np.maximum(raw, 1), counts - 1)
    return np.where(counts >= MIN_ROWS_FOR_HOLDOUT, sizes, 0)


def _last_positive_per_user(interactions: pd.DataFrame,
                            block_rows_sorted: NDArray[np.intp]) -> pd.DataFrame:
    """Target rows: the last positive of each user's block (block rows given in time order)."""
    positive = _positive_mask(interactions)[block_rows_sorted]
    candidates = block_rows_sorted[positive]
    users = interactions[USER_ID].to_numpy()[candidates]
    is_last = np.ones(len(candidates), dtype=bool)
    is_last[:-1] = users[1:] != users[:-1]
    return interactions.iloc[candidates[is_last]][TARGET_COLUMNS].reset_index(drop=True)


def _positive_mask(interactions: pd.DataFrame) -> NDArray[np.bool_]:
    """label == 1; a table without a label column is implicit data, so every row is positive."""
    if LABEL not in interactions.columns:
        return np.ones(len(interactions), dtype=bool)
    return np.asarray(interactions[LABEL].to_numpy() == 1, dtype=bool)


def _rows(interactions: pd.DataFrame, mask: NDArray[np.bool_]) -> pd.DataFrame:
    return interactions.loc[mask].reset_index(drop=True)
