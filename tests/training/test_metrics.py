"""Metrics and the negative sampler on tiny hand-checked inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID
from service.training import metrics
from service.training.metrics import (
    PAD,
    UserItemSets,
    auc,
    catalog_positions,
    full_ranking_hits,
    hit_rate_at_k,
    logloss,
    ndcg_at_k,
    popularity_scores,
    sample_negatives,
    sampled_pointwise,
    sampled_ranks,
    top_k_excluding,
)

CATALOG = np.array([str(i) for i in range(10)])


def interactions(pairs: list[tuple[str, str]], labels: list[int] | None = None) -> pd.DataFrame:
    users, items = zip(*pairs, strict=True)
    return pd.DataFrame({
        USER_ID: pd.Series(users, dtype=str), ITEM_ID: pd.Series(items, dtype=str),
        TIMESTAMP: np.arange(len(pairs), dtype=np.int64),
        LABEL: np.array(labels if labels is not None else [1] * len(pairs), dtype=np.int8),
    })


def targets(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return interactions(pairs)[[USER_ID, ITEM_ID, TIMESTAMP]]


# --- negative sampling ----------------------------------------------------------------------

# u1 touched items 0-4 (4 is the test item; its item-2 row is a label-0 row, which excludes
# item 2 all the same), so its candidates are exactly 5-9.
# u2 touched 0-7, leaving only 8 and 9: fewer than n=3, so it gets both plus one pad.
SEEN = interactions([("u1", str(i)) for i in range(5)] + [("u2", str(i)) for i in range(8)],
                    labels=[1, 1, 0, 1, 1] + [1] * 8)
TEST = targets([("u1", "4"), ("u2", "7")])


def test_sampler_draws_only_untouched_items_and_pads_short_rows() -> None:
    negatives = sample_negatives(TEST, SEEN, CATALOG, n=3, seed=0)
    assert negatives.shape == (2, 3)
    u1 = negatives[0]
    assert len(set(u1)) == 3 and set(u1) <= {5, 6, 7, 8, 9}
    # u2 has exactly two candidates (8, 9): all of them, then a pad.
    assert sorted(negatives[1][:2]) == [8, 9] and negatives[1][2] == PAD


def test_sampler_excludes_the_test_item_even_without_its_row() -> None:
    # The test item 9 does not appear in the interactions but must still never be drawn.
    negatives = sample_negatives(targets([("u", "9")]), interactions([("u", "0")]), CATALOG,
                                 n=8, seed=1)
    assert sorted(negatives[0]) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_sampler_is_reproducible_and_seed_dependent() -> None:
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(200)]
    pairs = [(u, str(item)) for u in users for item in rng.choice(500, 50, replace=False)]
    seen = interactions(pairs)
    test = seen.groupby(USER_ID, sort=True).tail(1)[[USER_ID, ITEM_ID, TIMESTAMP]]
    catalog = np.array([str(i) for i in range(500)])
    first = sample_negatives(test, seen, catalog, n=99, seed=7)
    assert np.array_equal(first, sample_negatives(test, seen, catalog, n=99, seed=7))
    assert not np.array_equal(first, sample_negatives(test, seen, catalog, n=99, seed=8))
    touched = UserItemSets.from_interactions(seen, test[USER_ID], catalog)
    for row, user_negatives in enumerate(first):
        assert len(np.unique(user_negatives)) == 99
        assert not np.isin(user_negatives, touched.row(row)).any()


def test_sampler_is_roughly_uniform() -> None:
    # 3000 users each touched items 0-4 of a 20-item catalog and draw 3 of the 15 others:
    # each candidate is drawn 3000 * 3/15 = 600 times in expectation, sd ~ sqrt(3000*0.2*0.8)
    # ~ 22, so every count within 600 +- 120 (5.5 sd).
    catalog = np.array([str(i) for i in range(20)])
    users = [f"u{i}" for i in range(3000)]
    seen = interactions([(u, str(item)) for u in users for item in range(5)])
    negatives = sample_negatives(targets([(u, "0") for u in users]), seen, catalog, n=3)
    counts = np.bincount(negatives.ravel(), minlength=20)
    assert counts[:5].sum() == 0
    assert np.all(np.abs(counts[5:] - 600) < 120)


def test_sampler_uses_exact_draw_for_heavy_users() -> None:
    # 12 of 20 items touched -> 8 candidates, below half the catalog: the exact path draws 3.
    catalog = np.array([str(i) for i in range(20)])
    seen = interactions([("u", str(item)) for item in range(12)])
    negatives = sample_negatives(targets([("u", "11")]), seen, catalog, n=3, seed=3)
    assert len(set(negatives[0])) == 3 and set(negatives[0]) <= set(range(12, 20))


# --- sampled ranking -------------------------------------------------------------------------

def test_sampled_ranks_count_ties_against_the_positive() -> None:
    pos = np.array([0.5, 0.5, 0.9])
    neg = np.array([[0.1, 0.6, 0.5],     # 0.6 > 0.5 and the tie 0.5 >= 0.5 -> rank 2
                    [0.1, 0.2, 0.3],     # nothing at or above 0.5 -> rank 0
                    [0.95, 0.99, 0.1]])  # two above -> rank 2
    assert sampled_ranks(pos, neg).tolist() == [2, 0, 2]
    # Masking out row 0's 0.6 (a pad) leaves only the tie -> rank 1.
    valid = np.ones_like(neg, dtype=bool)
    valid[0, 1] = False
    assert sampled_ranks(pos, neg, valid).tolist() == [1, 0, 2]


def test_constant_scorer_gets_the_worst_rank() -> None:
    assert sampled_ranks(np.zeros(2), np.zeros((2, 99))).tolist() == [99, 99]


def test_hit_rate_and_ndcg_by_hand() -> None:
    ranks = np.array([0, 1, 10])
    # HR@10: ranks 0 and 1 are < 10, rank 10 is not -> 2/3.
    assert hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)
    # NDCG@10: 1/log2(2) = 1, 1/log2(3) = 0.6309, 0 -> mean 0.5436.
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert math.isnan(hit_rate_at_k(np.array([]))) and math.isnan(ndcg_at_k(np.array([])))


def test_sampled_pointwise_labels_positive_then_valid_negatives() -> None:
    labels, scores = sampled_pointwise(np.array([0.9, 0.8]), np.array([[0.1, 0.2], [0.3, 0.4]]),
                                       np.array([[True, False], [True, True]]))
    assert labels.tolist() == [1, 1, 0, 0, 0]
    assert scores.tolist() == [0.9, 0.8, 0.1, 0.3, 0.4]


# --- full ranking ----------------------------------------------------------------------------

def test_top_k_excluding_skips_excluded_and_sorts() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.8, 0.3]])
    # Item 1 (0.9) is excluded -> 3 (0.8), 2 (0.5), 4 (0.3).
    assert top_k_excluding(scores, [np.array([1])], k=3).tolist() == [[3, 2, 4]]


def test_top_k_breaks_ties_by_lower_index() -> None:
    scores = np.array([[0.5, 0.7, 0.5, 0.5, 0.7],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    # Row 0: 0.7 at 1 and 4 (1 first), then the 0.5 tie goes to index 0.
    # Row 1: all equal, 0 excluded -> 1, 2, 3.
    top = top_k_excluding(scores, [np.array([], dtype=np.int64), np.array([0])], k=3)
    assert top.tolist() == [[1, 4, 0], [1, 2, 3]]


def test_top_k_pads_rows_with_too_few_allowed_items() -> None:
    scores = np.array([[0.3, 0.2, 0.1]])
    # Two of three excluded: one real item then pads; k above the catalog size pads too.
    assert top_k_excluding(scores, [np.array([0, 1])], k=2).tolist() == [[2, PAD]]
    assert top_k_excluding(scores, [np.array([0])], k=4).tolist() == [[1, 2, PAD, PAD]]


def test_top_k_accepts_user_item_sets() -> None:
    train = interactions([("a", "1"), ("a", "2"), ("b", "0")], labels=[1, 0, 1])
    # Positives only: a excludes item 1 (its item-2 row is a label-0 row), b excludes item 0.
    sets = UserItemSets.from_interactions(train, ["a", "b"], CATALOG, positives_only=True)
    assert [sets.row(0).tolist(), sets.row(1).tolist()] == [[1], [0]]
    scores = np.tile(np.arange(10.0)[::-1], (2, 1))  # item 0 best, item 9 worst
    assert top_k_excluding(scores, sets, k=2).tolist() == [[0, 2], [1, 2]]


def test_full_ranking_hits_by_hand() -> None:
    top = [["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"]]
    # User 0 hit at position 0 (gain 1), user 1 at position 2 (gain 1/log2(4) = 0.5),
    # user 2 missed -> HR 2/3, NDCG 1.5/3 = 0.5.
    hr, ndcg = full_ranking_hits(top, ["a", "b", "q"], k=3)
    assert (hr, ndcg) == (pytest.approx(2 / 3), pytest.approx(0.5))
    # With k=2 user 1's hit at position 2 no longer counts.
    assert full_ranking_hits(top, ["a", "b", "q"], k=2) == (pytest.approx(1 / 3), 1 / 3)
    # Catalog indices in a 2-D array work the same way.
    # User 0 hits at position 1 (gain 1/log2(3)), user 1 misses.
    hits = full_ranking_hits(np.array([[4, 7], [1, 2]]), np.array([7, 9]))
    assert hits == (0.5, pytest.approx(1 / math.log2(3) / 2))


# --- pointwise and baseline -----------------------------------------------------------------

def test_auc_perfect_reversed_and_undefined() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert math.isnan(auc(np.array([1, 1]), np.array([0.3, 0.4])))


def test_logloss_by_hand_and_clipped() -> None:
    # Both rows are off by 0.2: -ln(0.8) = 0.22314.
    assert logloss(np.array([1, 0]), np.array([0.8, 0.2])) == pytest.approx(-math.log(0.8))
    # A certain mistake is clipped to 1e-7: -ln(1e-7) / 1 = 16.118, not inf.
    assert logloss(np.array([1]), np.array([0.0])) == pytest.approx(-math.log(1e-7))


def test_popularity_counts_positive_rows_in_catalog() -> None:
    train = interactions([("u", "a"), ("v", "a"), ("u", "b"), ("u", "c"), ("u", "zz")],
                         labels=[1, 1, 1, 0, 1])
    # a: 2 positives, b: 1, c: only a label-0 row, d: none; zz is not in the catalog.
    assert popularity_scores(train, ["a", "b", "c", "d"]).tolist() == [2.0, 1.0, 0.0, 0.0]


def test_catalog_positions_and_unique_catalog() -> None:
    assert catalog_positions(["3", "x", "0"], CATALOG).tolist() == [3, -1, 0]
    with pytest.raises(ValueError, match="unique"):
        catalog_positions(["1"], ["1", "1"])


def test_sampler_redraws_users_left_short(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny first-round budget (ceil(0.05 * 99) + 16 = 21 draws) leaves every user short of
    # 99, so the doubling retry rounds must still deliver 99 distinct untouched items each.
    monkeypatch.setattr(metrics, "_DRAW_MARGIN", 0.05)
    catalog = np.array([str(i) for i in range(1000)])
    seen = interactions([(f"u{u}", str(item)) for u in range(20) for item in range(u, u + 30)])
    test = targets([(f"u{u}", str(u)) for u in range(20)])
    negatives = sample_negatives(test, seen, catalog, n=99, seed=0)
    for u, row in enumerate(negatives):
        assert len(np.unique(row)) == 99 and not np.isin(row, np.arange(u, u + 30)).any()


def test_top_k_ranks_nan_and_minus_inf_after_real_scores_but_before_excluded() -> None:
    scores = np.array([[np.nan, 0.2, -np.inf, 0.1]])
    # Item 3 excluded; allowed 1 (0.2), then NaN (0) and -inf (2) tie at the bottom -> 0, 2.
    assert top_k_excluding(scores, [np.array([3])], k=4).tolist() == [[1, 0, 2, PAD]]


def test_empty_inputs() -> None:
    empty_test = targets([("u", "1")]).iloc[:0]
    assert sample_negatives(empty_test, SEEN, CATALOG, n=5).shape == (0, 5)
    assert sample_negatives(TEST, SEEN, np.array([], dtype=str), n=5).tolist() == [[PAD] * 5] * 2
    assert top_k_excluding(np.zeros((0, 4)), [], k=2).shape == (0, 2)
    assert all(math.isnan(v) for v in full_ranking_hits([], []))


def test_top_k_chunks_rows_and_matches_a_plain_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 2 rows (10 cells / 5 items) must give what a full stable sort gives.
    monkeypatch.setattr(metrics, "_TOP_K_CHUNK_CELLS", 10)
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(7, 5)).astype(np.float32)  # many ties
    exclude = [rng.choice(5, size=int(rng.integers(0, 3)), replace=False) for _ in range(7)]
    expected = []
    for row, skip in zip(scores, exclude, strict=True):
        allowed = [i for i in np.argsort(-row, kind="stable") if i not in skip]
        expected.append((allowed + [PAD] * 3)[:3])
    assert top_k_excluding(scores, exclude, k=3).tolist() == expected
    # A broadcast (read-only view) of one score row per user works without copying it whole.
    view = np.broadcast_to(scores[0], (7, 5))
    best_two = np.argsort(-scores[0], kind="stable")[:2].tolist()
    assert top_k_excluding(view, [[]] * 7, k=2).tolist() == [best_two] * 7


@pytest.mark.parametrize("seed", range(5))
def test_one_ranking_for_every_row_equals_top_k_excluding(seed: int) -> None:
    # Many ties, NaN and -inf among the scores, and rows left with fewer than k allowed items.
    rng = np.random.default_rng(seed)
    n_items, n_users, k = 12, 40, 5
    scores = rng.integers(0, 4, n_items).astype(np.float32)
    scores[rng.choice(n_items, 3, replace=False)] = [np.nan, -np.inf, np.nan]
    exclude = UserItemSets.from_lists(
        [rng.choice(n_items, int(rng.integers(0, n_items + 1)), replace=False)
         for _ in range(n_users)], n_items)
    expected = top_k_excluding(np.broadcast_to(scores, (n_users, n_items)), exclude, k)
    assert (expected == PAD).any() and (expected != PAD).any()
    assert metrics.top_k_of_one_ranking(scores, exclude, k).tolist() == expected.tolist()
