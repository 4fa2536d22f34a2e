"""Offline ranking and pointwise metrics (pure numpy / scikit-learn).

Conventions:

* Items are addressed by their position in ``catalog_item_ids`` ("catalog index"); ``-1`` marks
  a missing item or a padding slot. Catalog ids must have the item_id column's type (str), and
  must be unique.
* Sampled ranking: a test user's positive is ranked among sampled negatives. The rank is
  PESSIMISTIC: rank = number of negatives scoring >= the positive, so a tie counts against the
  model and a constant scorer gets the worst rank instead of a lucky one.
* HR@k = 1 if rank < k; NDCG@k = 1 / log2(rank + 2) if rank < k else 0 (rank 0 -> 1.0,
  rank 1 -> 1/log2(3)). Reported values are means over users.
* Full ranking: a top-k list per user (ties broken by lower catalog index); HR@k = test item in
  the list, NDCG@k = 1 / log2(position + 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import log_loss, roc_auc_score

from service.data.dataset import ITEM_ID, LABEL, USER_ID

PAD = -1
# Probabilities are clipped to [EPS, 1 - EPS] so one confident mistake cannot make logloss inf.
LOGLOSS_EPS = 1e-7
# Users whose candidates are under this share of the catalog are sampled exactly, not by
# rejection (which would waste most draws on them).
_MIN_ACCEPT_RATE = 0.5
# Rejection draws per expected valid negative needed; a first round almost always suffices,
# and the rare unlucky user is simply redrawn with a doubled budget.
_DRAW_MARGIN = 1.25
_BATCH_CELLS = 4_000_000
# Score cells per top-k chunk: bounds the working copy (and its masks) to tens of MB.
_TOP_K_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class UserItemSets:
    """Per-user sets of catalog indices in CSR form: row u is indices[indptr[u]:indptr[u+1]].

    Each row is sorted ascending and has no duplicates. n_items is the catalog size.
    """

    indptr: NDArray[np.int64]
    indices: NDArray[np.int64]
    n_items: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, user: int) -> NDArray[np.int64]:
        return self.indices[self.indptr[user]:self.indptr[user + 1]]

    def sizes(self) -> NDArray[np.int64]:
        return np.diff(self.indptr)

    @classmethod
    def from_pairs(cls, users: NDArray[np.int64], items: NDArray[np.int64], n_users: int,
                   n_items: int) -> UserItemSets:
        """Build from (user row, catalog index) pairs; pairs with a -1 on either side drop."""
        keep = (users >= 0) & (items >= 0)
        keys = _sorted_unique(users[keep].astype(np.int64) * n_items + items[keep])
        rows, cols = np.divmod(keys, n_items)
        indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n_users))))
        return cls(indptr.astype(np.int64), cols.astype(np.int64), n_items)

    @classmethod
    def from_lists(cls, lists: Sequence[ArrayLike], n_items: int) -> UserItemSets:
        """Build from one array of catalog indices per user."""
        arrays = [np.asarray(items, dtype=np.int64).ravel() for items in lists]
        users = np.repeat(np.arange(len(arrays), dtype=np.int64), [len(a) for a in arrays])
        items = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls.from_pairs(users, items, len(arrays), n_items)

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, user_ids: ArrayLike,
                          catalog_item_ids: ArrayLike,
                          positives_only: bool = False) -> UserItemSets:
        """Items each of ``user_ids`` interacted with (row u for user_ids[u]).

        positives_only: keep only label-1 rows (a table without labels counts as all positive).
        Rows of other users or of items outside the catalog are ignored.
        """
        rows = interactions
        if positives_only and LABEL in interactions.columns:
            rows = interactions.loc[interactions[LABEL].to_numpy() == 1]
        users = _unique_index(user_ids, "user_ids").get_indexer(_as_index(rows[USER_ID]))
        catalog = _unique_index(catalog_item_ids, "catalog_item_ids")
        items = catalog.get_indexer(_as_index(rows[ITEM_ID]))
        return cls.from_pairs(users.astype(np.int64), items.astype(np.int64),
                              len(_as_index(user_ids)), len(catalog))


def catalog_positions(item_ids: ArrayLike, catalog_item_ids: ArrayLike) -> NDArray[np.int64]:
    """Catalog index of each item id; -1 for ids not in the catalog."""
    catalog = _unique_index(catalog_item_ids, "catalog_item_ids")
    return catalog.get_indexer(_as_index(item_ids)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Negative sampling
# ---------------------------------------------------------------------------------------------

def sample_negatives(test_items: pd.DataFrame, all_interactions: pd.DataFrame,
                     catalog_item_ids: ArrayLike, n: int = 99,
                     seed: int = 0) -> NDArray[np.int64]:
    """Draw n negatives per test user, uniformly without replacement.

    Negatives are catalog items the user never interacted with in any row of all_interactions
    (pass train + validation + test) and never the test item itself.

    Returns an int64 array [len(test_items), n] of catalog indices; row u belongs to
    test_items row u. A user with fewer than n candidates gets all of them, followed by -1 pads.
    The same inputs and seed always give the same draw.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    user_ids = test_items[USER_ID].to_numpy()
    excluded = UserItemSets.from_pairs(*_exclusion_pairs(test_items, all_interactions,
                                                         catalog_item_ids),
                                       n_users=len(user_ids),
                                       n_items=len(_as_index(catalog_item_ids)))
    out = np.full((len(user_ids), n), PAD, dtype=np.int64)
    if n == 0 or excluded.n_items == 0:
        return out
    rng = np.random.default_rng(seed)
    candidates = excluded.n_items - excluded.sizes()
    exact = candidates <= np.maximum(n, _MIN_ACCEPT_RATE * excluded.n_items)
    for user in np.flatnonzero(exact):
        picks = _sample_exact(excluded.row(int(user)), excluded.n_items, n, rng)
        out[user, :len(picks)] = picks
    _sample_by_rejection(np.flatnonzero(~exact), excluded, out, rng)
    return out


def _exclusion_pairs(test_items: pd.DataFrame, all_interactions: pd.DataFrame,
                     catalog_item_ids: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(test-user row, catalog index) of every interaction and of every test item."""
    users = _unique_index(test_items[USER_ID], "test_items user ids")
    catalog = _unique_index(catalog_item_ids, "catalog_item_ids")
    seen_users = users.get_indexer(_as_index(all_interactions[USER_ID])).astype(np.int64)
    seen_items = catalog.get_indexer(_as_index(all_interactions[ITEM_ID])).astype(np.int64)
    test_users = np.arange(len(users), dtype=np.int64)
    test_positions = catalog.get_indexer(_as_index(test_items[ITEM_ID])).astype(np.int64)
    return (np.concatenate((seen_users, test_users)),
            np.concatenate((seen_items, test_positions)))


def _sample_exact(excluded: NDArray[np.int64], n_items: int, n: int,
                  rng: np.random.Generator) -> NDArray[np.int64]:
    """All candidates if at most n, else n of them uniformly without replacement."""
    candidates = np.setdiff1d(np.arange(n_items, dtype=np.int64), excluded, assume_unique=True)
    if len(candidates) <= n:
        return candidates
    return rng.choice(candidates, size=n, replace=False)


def _sample_by_rejection(users: NDArray[np.int64], excluded: UserItemSets,
                         out: NDArray[np.int64], rng: np.random.Generator) -> None:
    """Fill out[users] by drawing items with replacement and keeping the first n distinct
    non-excluded ones per user, which is a uniform draw without replacement."""
    n = out.shape[1]
    exclusion_keys = _pair_keys(excluded)
    acceptance = 1.0 - excluded.sizes() / excluded.n_items
    margin = _DRAW_MARGIN
    pending = users
    while len(pending):
        batch_size = max(1, _BATCH_CELLS // (int(margin * n / _MIN_ACCEPT_RATE) + 16))
        unfinished = []
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            # Enough draws for the batch's least accepting user to get n valid ones on average.
            draws = math.ceil(margin * n / acceptance[batch].min()) + 16
            unfinished.append(_fill_batch(batch, draws, exclusion_keys, excluded.n_items,
                                          out, rng))
        pending = np.concatenate(unfinished)
        margin *= 2


def _fill_batch(users: NDArray[np.int64], draws: int, exclusion_keys: NDArray[np.int64],
                n_items: int, out: NDArray[np.int64],
                rng: np.random.Generator) -> NDArray[np.int64]:
    """One rejection round for a batch of users; returns the users still short of n."""
    n = out.shape[1]
    items = rng.integers(0, n_items, size=(len(users), draws), dtype=np.int64)
    keys = (users[:, None] * n_items + items).ravel()
    allowed = np.flatnonzero(~_contains(exclusion_keys, keys))
    # return_index gives each distinct key's first occurrence, i.e. keeps draw order.
    _, first = np.unique(keys[allowed], return_index=True)
    kept = np.sort(allowed[first])
    rows = kept // draws
    slot = _positions_in_groups(rows)
    take = slot < n
    out[users[rows[take]], slot[take]] = items.ravel()[kept[take]]
    short = users[np.bincount(rows, minlength=len(users)) < n]
    out[short] = PAD
    return short


def _pair_keys(sets: UserItemSets) -> NDArray[np.int64]:
    """Sorted user * n_items + item keys of every (user, item) pair in the sets."""
    users = np.repeat(np.arange(len(sets), dtype=np.int64), sets.sizes())
    return users * sets.n_items + sets.indices


def _contains(sorted_keys: NDArray[np.int64], keys: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Membership of keys in a sorted array, by binary search."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.asarray(sorted_keys[at] == keys, dtype=bool)


def _positions_in_groups(sorted_groups: NDArray[np.int64]) -> NDArray[np.int64]:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start_index = np.flatnonzero(starts)
    run_start = np.repeat(start_index, np.diff(np.append(start_index, n)))
    return (np.arange(n) - run_start).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Sampled ranking
# ---------------------------------------------------------------------------------------------

def sampled_ranks(pos_scores: ArrayLike, neg_scores: ArrayLike,
                  valid: ArrayLike | None = None) -> NDArray[np.int64]:
    """Pessimistic rank of each user's positive: #negatives with score >= the positive's.

    pos_scores: [U]; neg_scores: [U, n]; valid: optional bool [U, n], False for padding slots
    (e.g. ``negatives != PAD``). NaN negative scores never count; NaN positives are an error.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if np.isnan(pos).any():
        raise ValueError("positive scores contain NaN")
    beats = neg >= pos[:, None]
    if valid is not None:
        beats &= np.asarray(valid, dtype=bool)
    return beats.sum(axis=1).astype(np.int64)


def hit_rate_at_k(ranks: ArrayLike, k: int = 10) -> float:
    """Share of users whose rank is below k (nan for no users)."""
    r = np.asarray(ranks)
    return float(np.mean(r < k)) if r.size else math.nan


def ndcg_at_k(ranks: ArrayLike, k: int = 10) -> float:
    """Mean of 1/log2(rank + 2) for rank < k, 0 otherwise (nan for no users)."""
    r = np.asarray(ranks, dtype=np.float64)
    if not r.size:
        return math.nan
    gains = np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)
    return float(np.mean(gains))


def sampled_pointwise(pos_scores: ArrayLike, neg_scores: ArrayLike,
                      valid: ArrayLike | None = None
                      ) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    """Labels and scores of the implicit-data pointwise set: each positive (label 1) plus its
    valid sampled negatives (label 0), as flat arrays for auc / logloss."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    keep = np.ones(neg.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    labels = np.concatenate((np.ones(len(pos), dtype=np.int8),
                             np.zeros(int(keep.sum()), dtype=np.int8)))
    return labels, np.concatenate((pos, neg[keep]))


# ---------------------------------------------------------------------------------------------
# Full ranking
# ---------------------------------------------------------------------------------------------

def top_k_excluding(scores: ArrayLike, exclude: UserItemSets | Sequence[ArrayLike],
                    k: int) -> NDArray[np.int64]:
    """Indices of each row's k highest scores, skipping that row's excluded indices.

    scores: [U, N]; exclude: per-row catalog indices to skip (for the protocol: the items of
    the user's positive train + validation rows, ``UserItemSets.from_interactions(...,
    positives_only=True)``). Rows come out best first; equal scores are broken by the lower
    index; NaN and -inf scores rank last among allowed items. When a row has fewer than k
    allowed items, its trailing slots are -1. Only the k winners are sorted (argpartition).
    Rows are processed in chunks, so a broadcast view of one score row per user is cheap.
    """
    matrix = np.asarray(scores)
    n_rows, n_items = matrix.shape
    sets = exclude if isinstance(exclude, UserItemSets) else UserItemSets.from_lists(
        exclude, n_items)
    if len(sets) != n_rows:
        raise ValueError(f"exclude has {len(sets)} rows, scores has {n_rows}")
    top = np.full((n_rows, k), PAD, dtype=np.int64)
    step = max(1, _TOP_K_CHUNK_CELLS // max(n_items, 1))
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        top[rows, :min(k, n_items)] = _top_k_rows(matrix[rows], sets, start, k)
    return top


def top_k_of_one_ranking(scores: ArrayLike, exclude: UserItemSets, k: int
                         ) -> NDArray[np.int64]:
    """top_k_excluding for one score per item shared by every row (popularity), with the same
    ties, NaN and padding rules: the catalog is sorted once, and each row takes the first k
    items of that order it does not exclude. [U, N] cells cost minutes at 37k users x 100k
    items; this costs one sort and a few array calls per row."""
    values = np.asarray(scores, dtype=np.float64)
    n_items = len(values)
    # NaN and -inf rank last, as in top_k_excluding; ties: the lower index first.
    key = np.where(values > -np.inf, values, -np.inf)
    order = np.lexsort((np.arange(n_items), -key))
    rank_of = np.empty(n_items, dtype=np.int64)
    rank_of[order] = np.arange(n_items)
    top = np.full((len(exclude), k), PAD, dtype=np.int64)
    for user in range(len(exclude)):
        skipped = np.sort(rank_of[exclude.row(user)])
        # Allowed slots before each skipped rank: the j-th allowed item's rank is j plus the
        # skipped ranks at or before it.
        before = skipped - np.arange(len(skipped))
        slots = np.arange(min(k, n_items - len(skipped)))
        top[user, :len(slots)] = order[slots + np.searchsorted(before, slots, side="right")]
    return top


def _top_k_rows(scores: NDArray[np.generic], sets: UserItemSets, first_row: int,
                k: int) -> NDArray[np.int64]:
    """top_k_excluding for a block of rows starting at first_row; min(k, N) columns."""
    # A copy (excluded cells are overwritten); float32 scores stay float32 to halve memory.
    masked: NDArray[np.floating] = np.array(
        scores, dtype=np.float32 if scores.dtype == np.float32 else np.float64)
    n_rows, n_items = masked.shape
    # -inf is reserved for excluded cells, so NaN / -inf scores sit just above them and the
    # first `allowed` slots of every row are exactly its allowed items.
    masked[~(masked > -np.inf)] = np.finfo(masked.dtype).min
    lo, hi = sets.indptr[first_row], sets.indptr[first_row + n_rows]
    sizes = sets.sizes()[first_row:first_row + n_rows]
    masked[np.repeat(np.arange(n_rows), sizes), sets.indices[lo:hi]] = -np.inf
    k_eff = min(k, n_items)
    top = _top_k_lowest_index_ties(masked, k_eff)
    top[np.arange(k_eff)[None, :] >= (n_items - sizes)[:, None]] = PAD
    return top


def _top_k_lowest_index_ties(scores: NDArray[np.floating], k: int) -> NDArray[np.int64]:
    """Exact top-k per row, sorted; among equal scores the lower index wins."""
    n_rows, n_items = scores.shape
    if k == 0 or n_rows == 0:
        return np.zeros((n_rows, k), dtype=np.int64)
    # The k-th largest value per row; argpartition alone would pick arbitrary tied items.
    partition = np.argpartition(scores, n_items - k, axis=1)[:, n_items - k:n_items - k + 1]
    kth = np.take_along_axis(scores, partition, axis=1)
    chosen = scores >= kth
    # Only rows where ties at the k-th value overflow k need the (costlier) lowest-index cut.
    tied = np.flatnonzero(chosen.sum(axis=1) > k)
    if len(tied):
        rows, row_kth = scores[tied], kth[tied]
        at = rows == row_kth
        room = k - (rows > row_kth).sum(axis=1, keepdims=True)
        chosen[tied] = (rows > row_kth) | (at & (np.cumsum(at, axis=1, dtype=np.int32) <= room))
    index = np.nonzero(chosen)[1].reshape(n_rows, k)  # ascending index within each row
    order = np.argsort(-np.take_along_axis(scores, index, axis=1), axis=1, kind="stable")
    return np.take_along_axis(index, order, axis=1).astype(np.int64)


def full_ranking_hits(top_k_ids: Sequence[Sequence[object]] | NDArray[np.generic],
                      test_item_ids: ArrayLike, k: int = 10) -> tuple[float, float]:
    """Mean HR@k and NDCG@k of test items against per-user top lists (best first).

    Only the first k entries of each list count; ids may be catalog indices or item ids, as
    long as both arguments use the same kind. Returns (nan, nan) for no users.
    """
    targets = np.asarray(test_item_ids)
    if len(top_k_ids) != len(targets):
        raise ValueError(f"{len(top_k_ids)} top lists for {len(targets)} test items")
    if not len(targets):
        return math.nan, math.nan
    positions = np.array([_position_in(lst, target, k)
                          for lst, target in zip(top_k_ids, targets, strict=True)])
    hit = positions >= 0
    gains = np.where(hit, 1.0 / np.log2(np.maximum(positions, 0) + 2.0), 0.0)
    return float(np.mean(hit)), float(np.mean(gains))


def _position_in(top_list: Sequence[object] | NDArray[np.generic], target: object,
                 k: int) -> int:
    """0-based position of target among the first k entries, -1 when absent."""
    matches = np.flatnonzero(np.asarray(top_list)[:k] == target)
    return int(matches[0]) if len(matches) else -1


# ---------------------------------------------------------------------------------------------
# Pointwise metrics and baseline
# ---------------------------------------------------------------------------------------------

def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC (sklearn); nan when only one class is present, where AUC is undefined."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def logloss(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy (sklearn) of probabilities clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(log_loss(np.asarray(labels), p, labels=[0, 1]))


def popularity_scores(train_interactions: pd.DataFrame,
                      catalog_item_ids: ArrayLike) -> NDArray[np.float64]:
    """Popularity baseline: number of positive training rows per catalog item ([N] float64).

    A table without a label column counts every row as positive.
    """
    rows = train_interactions
    if LABEL in rows.columns:
        rows = rows.loc[rows[LABEL].to_numpy() == 1]
    positions = catalog_positions(rows[ITEM_ID], catalog_item_ids)
    n_items = len(_as_index(catalog_item_ids))
    return np.bincount(positions[positions >= 0], minlength=n_items).astype(np.float64)


def _sorted_unique(values: NDArray[np.int64]) -> NDArray[np.int64]:
    """np.unique by plain sort; several times faster than its hashing path for int keys."""
    ordered = np.sort(values)
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return ordered[keep]


def _as_index(values: ArrayLike | pd.Series) -> pd.Index:
    """Keeps a Series' dtype (no object copy of a million strings)."""
    if isinstance(values, pd.Index):
        return values
    return pd.Index(values if isinstance(values, pd.Series) else np.asarray(values))


def _unique_index(values: ArrayLike, name: str) -> pd.Index:
    """An index for get_indexer lookups, which needs unique values."""
    index = _as_index(values)
    if not index.is_unique:
        raise ValueError(f"{name} must be unique")
    return index
