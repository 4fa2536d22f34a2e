"""The evaluation protocol end to end on a tiny hand-checked example, with the project's own
functions (split.leave_last_out, evaluate.make_eval_set, metrics, pipeline.histories):

* per user the test item is the last interaction by time, the validation item the one before;
  timestamp ties go to the larger item id, compared as integers;
* sampled negatives: 99 distinct items (all there are when fewer) the user never interacted
  with in any part, never the test item, the same under the same seed;
* HR@10 / NDCG@10 from a known rank (pessimistic on ties);
* full ranking: the user's training items (train + validation) are excluded, the test item is
  not, and the served "seen" history is exactly those training items.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, USER_ID, FeatureSpec
from service.training import evaluate, metrics
from service.training.features import fit_feature_schema
from service.training.pipeline import histories
from service.training.split import Split, leave_last_out

# (user, item, timestamp). Ties: user 1 at t=300 (items 9 and 10: 10 is later, although "10" <
# "9" as strings), user 2 at t=60 (2 and 8), user 3 everywhere (11 > 3 > 2 > 1 as integers).
# User 5 has 3 rows: a test item, but the 2 rows left are too few (split.MIN_ROWS_FOR_HOLDOUT)
# for a validation item. User 4 has 2 rows: no holdout at all.
ROWS = [
    ("1", "5", 100), ("1", "3", 200), ("1", "10", 300), ("1", "9", 300),
    ("2", "7", 50), ("2", "8", 60), ("2", "2", 60), ("2", "4", 70),
    ("3", "2", 10), ("3", "3", 10), ("3", "11", 10), ("3", "1", 10),
    ("4", "6", 5), ("4", "1", 6),
    ("5", "12", 7), ("5", "4", 8), ("5", "6", 9),
]
TEST = {"1": "10", "2": "4", "3": "11", "5": "6"}
VALIDATION = {"1": "9", "2": "8", "3": "3"}
TRAIN = {"1": {"5", "3"}, "2": {"7", "2"}, "3": {"1", "2"}, "4": {"6", "1"}, "5": {"12", "4"}}
TOUCHED = {u: {i for v, i, _ in ROWS if v == u} for u in TEST}
BIG_CATALOG = [str(i) for i in range(1, 151)]  # 150 items: every user has >= 99 candidates
SMALL_CATALOG = [str(i) for i in range(1, 13)]  # 12 items: fewer than 99 candidates


def interactions() -> pd.DataFrame:
    frame = pd.DataFrame(ROWS, columns=[USER_ID, ITEM_ID, TIMESTAMP])
    frame[TIMESTAMP] = frame[TIMESTAMP].astype(np.int64)
    frame[LABEL] = np.int8(1)
    return frame


def by_user(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame[USER_ID], frame[ITEM_ID], strict=True))


def items_by_user(frame: pd.DataFrame) -> dict[str, set[str]]:
    return {str(u): set(g) for u, g in frame.groupby(USER_ID)[ITEM_ID]}


def eval_sets(catalog_ids: list[str], seed: int = 0
              ) -> tuple[Split, evaluate.EvalSet, evaluate.EvalSet]:
    """The split and the validation / test sets built exactly as pipeline.run builds them."""
    data = interactions()
    split = leave_last_out(data)
    users = pd.DataFrame({USER_ID: sorted(data[USER_ID].unique())})
    items = pd.DataFrame({ITEM_ID: catalog_ids})
    schema = fit_feature_schema(split.train, users, items, FeatureSpec(), FeatureSpec(), 5)
    catalog = pd.Index(items[ITEM_ID])
    known = pd.concat([split.train, split.validation], ignore_index=True)
    validation = evaluate.make_eval_set(split.validation_items, split.train, data, None,
                                        catalog, schema, seed)
    test = evaluate.make_eval_set(split.test_items, known, data, None, catalog, schema, seed)
    return split, validation, test


def ids(data: evaluate.EvalSet, rows: np.ndarray) -> set[str]:
    return {str(data.catalog[int(r)]) for r in rows if r >= 0}


# ---- split ---------------------------------------------------------------------------------------

def test_split_takes_last_by_time_and_breaks_ties_by_larger_integer_id() -> None:
    split = leave_last_out(interactions())
    assert by_user(split.test_items) == TEST
    assert by_user(split.validation_items) == VALIDATION
    assert items_by_user(split.train) == TRAIN
    # Implicit data: the pointwise blocks are exactly the ranking targets.
    assert by_user(split.test) == TEST
    assert by_user(split.validation) == VALIDATION


def test_split_does_not_depend_on_row_order() -> None:
    shuffled = interactions().sample(frac=1.0, random_state=3).reset_index(drop=True)
    split = leave_last_out(shuffled)
    assert by_user(split.test_items) == TEST
    assert by_user(split.validation_items) == VALIDATION


# ---- sampled negatives ---------------------------------------------------------------------------

def test_negatives_are_99_distinct_untouched_items_and_never_the_test_item() -> None:
    _, _, test = eval_sets(BIG_CATALOG)
    assert test.negatives.shape == (4, 99)
    assert (test.negatives >= 0).all()
    for row, user in enumerate(test.targets[USER_ID]):
        negatives = test.negatives[row]
        assert len(set(negatives.tolist())) == 99
        assert not ids(test, negatives) & TOUCHED[user]  # train, validation and test items
        assert TEST[user] not in ids(test, negatives)
        assert test.catalog[test.target_rows[row]] == TEST[user]


def test_validation_negatives_also_avoid_the_test_item() -> None:
    """Validation negatives are drawn against every interaction, the later test one too."""
    _, validation, _ = eval_sets(BIG_CATALOG)
    assert by_user(validation.targets) == VALIDATION
    for row, user in enumerate(validation.targets[USER_ID]):
        assert not ids(validation, validation.negatives[row]) & TOUCHED[user]


def test_negatives_are_all_candidates_when_fewer_than_99() -> None:
    _, _, test = eval_sets(SMALL_CATALOG)
    for row, user in enumerate(test.targets[USER_ID]):
        negatives = test.negatives[row]
        candidates = set(SMALL_CATALOG) - TOUCHED[user]
        assert ids(test, negatives) == candidates
        assert (negatives[:len(candidates)] >= 0).all()
        assert (negatives[len(candidates):] == metrics.PAD).all()


def test_negatives_are_deterministic_under_the_seed() -> None:
    first = eval_sets(BIG_CATALOG, seed=0)[2].negatives
    again = eval_sets(BIG_CATALOG, seed=0)[2].negatives
    other = eval_sets(BIG_CATALOG, seed=1)[2].negatives
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


# ---- metrics from known ranks --------------------------------------------------------------------

def scores_with_target_rank(test: evaluate.EvalSet, ranks: list[int]) -> np.ndarray:
    """Catalog scores per test user: training items highest (so only exclusion keeps them out
    of the top 10), then the user's negatives descending, with the target placed so that
    exactly `rank` negatives score above it; every other item scores 0."""
    n_users = len(test.targets)
    scores = np.zeros((n_users, len(test.catalog)), dtype=np.float32)
    for row in range(n_users):
        scores[row, test.exclude.row(row)] = 1000.0
        negatives = test.negatives[row][test.negatives[row] >= 0]
        scores[row, negatives] = 500.0 - np.arange(len(negatives), dtype=np.float32)
        scores[row, test.target_rows[row]] = 500.5 - ranks[row]
    return scores


def test_sampled_and_full_metrics_by_hand_for_known_ranks() -> None:
    _, _, test = eval_sets(BIG_CATALOG)
    ranks = [0, 3, 10, 9]  # users 1, 2, 3, 5
    scores = scores_with_target_rank(test, ranks)
    rows = np.arange(len(test.targets))
    pos = scores[rows, test.target_rows]
    neg = np.take_along_axis(scores, test.negatives, axis=1)
    np.testing.assert_array_equal(metrics.sampled_ranks(pos, neg), ranks)
    top = metrics.top_k_excluding(scores, test.exclude, evaluate.K)
    values = evaluate.ranking_metrics(pos, neg, top, test)
    expected_ndcg = (1.0 + 1.0 / math.log2(5) + 0.0 + 1.0 / math.log2(11)) / 4
    assert values["sampled_hr@10"] == pytest.approx(3 / 4)
    assert values["sampled_ndcg@10"] == pytest.approx(expected_ndcg)
    # Full ranking: the excluded training items score highest but never appear, so the target
    # sits at the same position as in the sampled list (negatives are the next best items).
    for row in range(len(rows)):
        assert not set(top[row].tolist()) & set(test.exclude.row(row).tolist())
    assert [list(top[r]).index(test.target_rows[r]) if test.target_rows[r] in top[r] else -1
            for r in rows] == [0, 3, -1, 9]
    assert values["full_hr@10"] == pytest.approx(3 / 4)
    assert values["full_ndcg@10"] == pytest.approx(expected_ndcg)


def test_rank_formulas_and_pessimistic_ties() -> None:
    assert metrics.ndcg_at_k([0]) == 1.0
    assert metrics.ndcg_at_k([3]) == pytest.approx(1 / math.log2(5))
    assert metrics.ndcg_at_k([9]) == pytest.approx(1 / math.log2(11))
    assert metrics.ndcg_at_k([10]) == 0.0
    assert metrics.hit_rate_at_k([0, 9, 10, 50]) == 0.5
    # A negative scoring exactly like the positive counts against it.
    assert metrics.sampled_ranks([0.5], [[0.5, 0.1, 0.9]]).tolist() == [2]


# ---- full protocol: what is excluded -------------------------------------------------------------

def test_full_protocol_excludes_training_items_but_not_the_test_item() -> None:
    split, validation, test = eval_sets(BIG_CATALOG)
    for row, user in enumerate(test.targets[USER_ID]):
        excluded = ids(test, test.exclude.row(row))
        assert excluded == TRAIN[user] | ({VALIDATION[user]} if user in VALIDATION else set())
        assert TEST[user] not in excluded
    for row, user in enumerate(validation.targets[USER_ID]):
        assert ids(validation, validation.exclude.row(row)) == TRAIN[user]
    # What the service excludes as "seen": the exported history, built from the same rows.
    known = pd.concat([split.train, split.validation], ignore_index=True)
    seen = {u: set(h) for u, h in histories(known).items()}
    assert seen == {u: TRAIN[u] | ({VALIDATION[u]} if u in VALIDATION else set())
                    for u in TRAIN}


def test_a_target_among_only_excluded_items_still_ranks_first() -> None:
    """Full ranking over a catalog where everything but the test item is excluded or scores
    lower: the test item is the first allowed one."""
    _, _, test = eval_sets(SMALL_CATALOG)
    scores = np.zeros((len(test.targets), len(test.catalog)), dtype=np.float32)
    scores[np.arange(len(test.targets)), test.target_rows] = 1.0
    top = metrics.top_k_excluding(scores, test.exclude, evaluate.K)
    hr, ndcg = metrics.full_ranking_hits(top, test.target_rows, evaluate.K)
    assert (hr, ndcg) == (1.0, 1.0)


# ---- the real data -------------------------------------------------------------------------------

def ml100k_path() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"
    return Path(os.environ.get("RECSYS_ML100K", default))


@pytest.mark.skipif(not (ml100k_path() / "u.data").is_file(), reason="ML-100K not present")
def test_protocol_on_ml100k() -> None:
    from service.data.load import load_dataset

    dataset = load_dataset(str(ml100k_path()))
    data = dataset.interactions
    split = leave_last_out(data)
    assert len(split.test_items) == data[USER_ID].nunique() == 943
    # The test item: the largest (timestamp, integer item id) of each user.
    keyed = data.assign(_item=data[ITEM_ID].astype(int))
    last = keyed.sort_values([USER_ID, TIMESTAMP, "_item"]).groupby(USER_ID).tail(1)
    assert by_user(split.test_items) == by_user(last)
    rest = keyed.drop(last.index)
    before = rest.sort_values([USER_ID, TIMESTAMP, "_item"]).groupby(USER_ID).tail(1)
    assert by_user(split.validation_items) == by_user(before)
    items = dataset.items
    schema = fit_feature_schema(split.train, dataset.users, items, FeatureSpec(), FeatureSpec(),
                                5)
    known = pd.concat([split.train, split.validation], ignore_index=True)
    catalog = pd.Index(items[ITEM_ID])
    test = evaluate.make_eval_set(split.test_items, known, data, None, catalog, schema, 0)
    assert (test.negatives >= 0).all()
    touched = items_by_user(data)
    for row, user in enumerate(test.targets[USER_ID]):
        negatives = test.negatives[row]
        assert len(np.unique(negatives)) == 99
        assert not ids(test, negatives) & touched[user]


def test_histories_follow_the_protocols_time_order() -> None:
    """The user tower's history ends with what the split calls the latest item: ties in time
    go to the larger item id, as integers (user 1's 9 then 10; user 3's 1, 2, 3, 11)."""
    stored = histories(interactions())
    assert stored["1"] == ["5", "3", "9", "10"]
    assert stored["2"] == ["7", "2", "8", "4"]
    assert stored["3"] == ["1", "2", "3", "11"]
