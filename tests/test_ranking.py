"""top_k_indices and rank against numpy's full argsort, on sizes that take both code paths."""

from __future__ import annotations

import numpy as np
import pytest

from service import ranking
from service.model_format import RETRIEVAL_DOT, RETRIEVAL_EXHAUSTIVE
from service.ranking import (
    PARALLEL_MIN_ITEMS,
    RETRIEVAL_BLOCK_BYTES,
    Allowed,
    inner_products,
    rank,
    reaching,
    retrieve,
    top_k_indices,
    top_k_of_columns,
)


def reference(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties by lower index: a stable sort of the negated scores."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize(("n", "k"), [(50, 100), (5000, 10), (20000, 5), (100_000, 10),
                                      (100_000, 200), (100_000, 1000), (300_000, 50)])
def test_top_k_matches_argsort(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    scores = rng.standard_normal((6, n)).astype(np.float32)
    scores[0, rng.integers(0, n, n // 2)] = -np.inf          # half excluded
    scores[1] = -np.inf
    scores[1, :3] = 1.0                                       # fewer allowed than k
    scores[2] = np.round(scores[2], 1)                        # many ties
    scores[3] = 0.5                                           # all tied
    scores[4] = np.sort(scores[4])                            # adversarial order
    want = reference(scores, k)
    finite = np.isfinite(np.take_along_axis(scores, want, axis=1))
    # Rows of scores, and columns of the retrieval's [N, U] matrix in either memory order or
    # as the first columns of a wider one (inner_products' padded product), or of a view.
    wider = np.zeros((n, 8), dtype=np.float32)
    wider[:, :6] = scores.T
    for got in (top_k_indices(scores, k), top_k_of_columns(np.ascontiguousarray(scores.T), k),
                top_k_of_columns(scores.T, k), top_k_of_columns(wider, k, columns=6),
                top_k_of_columns(wider[:, :6], k)):
        assert np.array_equal(np.where(finite, got, -1), np.where(finite, want, -1))


@pytest.mark.parametrize(("n", "width"), [(1000, 3), (1024, 8), (77, 2000)])
def test_reaching_is_flatnonzero_of_the_compare(n: int, width: int) -> None:
    """Rows folded into lines (with a remainder of rows, or one row a line) change nothing."""
    rng = np.random.default_rng(width)
    scores = rng.standard_normal((n, width)).astype(np.float32)
    thresholds = rng.standard_normal(width).astype(np.float32)
    thresholds[0] = np.inf
    assert np.array_equal(reaching(scores, thresholds), np.flatnonzero(scores >= thresholds))


# Also with the head's candidates in blocks of 8 (their item embeddings: 4 users x 8 items x
# 8 dimensions x 4 bytes); retrieval's blocks never hold fewer rows than its depth, the whole
# catalog here (test_retrieval_in_blocks_picks_what_one_block_does tests those).
@pytest.mark.parametrize("block_bytes", [RETRIEVAL_BLOCK_BYTES, 4 * 4 * 70])
@pytest.mark.parametrize("retrieval", [RETRIEVAL_DOT, RETRIEVAL_EXHAUSTIVE])
def test_rank_with_full_depth_is_a_brute_force_ranking(
        retrieval: str, block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranking, "RETRIEVAL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    users = rng.standard_normal((4, 8)).astype(np.float32)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    weights = rng.standard_normal(8).astype(np.float32)

    def head(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ud,umd->um", u, c) + c @ weights

    allowed = rng.random((4, 300)) > 0.3
    # The same rule as a mask, as excluded rows, as both, and no rule (user 3: everything).
    allowed[3] = True
    rules = [Allowed(mask=allowed[0]), Allowed(excluded=np.flatnonzero(~allowed[1])),
             Allowed(mask=allowed[2] | (np.arange(300) % 2 == 0),
                     excluded=np.flatnonzero(~allowed[2] & (np.arange(300) % 2 == 0))), None]
    indices, scores = rank(users, items, 10, head, retrieval, depth=300, allowed=rules)
    full = np.where(allowed, head(users, np.broadcast_to(items, (4, 300, 8))), -np.inf)
    assert np.array_equal(indices, reference(full.astype(np.float32), 10))
    assert np.allclose(scores, np.take_along_axis(full, indices, axis=1), atol=1e-5)


@pytest.mark.parametrize("n_users", [1, 2, 3, 7, 8, 13])
def test_inner_products_equal_the_plain_product(n_users: int) -> None:
    """One user's product split across threads, and batches padded with zero users."""
    rng = np.random.default_rng(n_users)
    users = rng.standard_normal((n_users, 16)).astype(np.float32)
    items = rng.standard_normal((PARALLEL_MIN_ITEMS + 123, 16)).astype(np.float32)
    got = inner_products(users, items)
    assert got.flags.c_contiguous and got.shape[1] >= n_users
    assert np.allclose(got[:, :n_users], items @ users.T, atol=1e-5)
    assert not got[:, n_users:].any()


def test_rank_with_proposed_candidates_and_its_fallback() -> None:
    """A proposer's candidates replace the exact retrieval, padded slots and disallowed items
    dropped; when they leave a user fewer than k allowed items, the exact retrieval runs."""
    rng = np.random.default_rng(5)
    users = rng.standard_normal((3, 8)).astype(np.float32)
    items = rng.standard_normal((400, 8)).astype(np.float32)

    def head(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ud,umd->um", u, c)

    mask = rng.random((3, 400)) > 0.2
    allowed = [Allowed(mask=row) for row in mask]
    exact = rank(users, items, 10, head, RETRIEVAL_DOT, depth=50, allowed=allowed)
    best = np.argsort(-(users @ items.T), axis=1, kind="stable")

    def perfect(u: np.ndarray, n: int) -> np.ndarray:
        return np.concatenate([best[:, :n - 5], np.full((3, 5), -1)], axis=1)

    # The top 45 by u·c hold the top 10 of the head (which is u·c here).
    got = rank(users, items, 10, head, RETRIEVAL_DOT, depth=50, allowed=allowed,
               propose=perfect)
    assert np.array_equal(got[0], exact[0]) and np.allclose(got[1], exact[1])

    calls: list[int] = []

    def poor(u: np.ndarray, n: int) -> np.ndarray:
        calls.append(n)
        return np.tile(np.arange(12), (3, 1))  # some of these 12 are not allowed

    assert (~mask[:, :12]).any(axis=1).any()
    fallback = rank(users, items, 10, head, RETRIEVAL_DOT, depth=50, allowed=allowed,
                    propose=poor)
    assert calls == [50]
    assert np.array_equal(fallback[0], exact[0])


# The catalog's scores in one block, or (for 5 users, padded to 8) in blocks of 9,000 rows:
# 5 whole blocks, a ragged last one, and each user's exclusions in several of them.
@pytest.mark.parametrize("block_bytes", [RETRIEVAL_BLOCK_BYTES, 4 * 8 * 9_000])
def test_rank_on_a_large_catalog_with_exclusions_matches_brute_force(
        block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled-threshold path (catalog > SMALL_CATALOG), several users at once, each with
    its own excluded rows, and the parallel product: the same as a full sort per user, in one
    block of rows or in several (RETRIEVAL_BLOCK_BYTES)."""
    monkeypatch.setattr(ranking, "RETRIEVAL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(7)
    users = rng.standard_normal((5, 16)).astype(np.float32)
    items = rng.standard_normal((PARALLEL_MIN_ITEMS + 77, 16)).astype(np.float32)

    def head(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ud,umd->um", u, c)

    coarse = users @ items.T
    best = np.argsort(-coarse, axis=1, kind="stable")
    # User 0 loses its 30 best items, user 1 every item but 4 (fewer than k), user 2 nothing.
    rules = [Allowed(excluded=best[0, :30]), Allowed(excluded=best[1, 4:]), Allowed(), None,
             Allowed(mask=np.arange(len(items)) % 3 == 0)]
    indices, _ = rank(users, items, 10, head, RETRIEVAL_DOT, depth=40, allowed=rules)
    for user, rule in enumerate(rules):
        ok = np.ones(len(items), bool) if rule is None else rule.rows_ok(np.arange(len(items)))
        want = [int(i) for i in best[user] if ok[i]][:10]
        assert [int(i) for i in indices[user] if i >= 0] == want


def test_retrieval_in_blocks_picks_what_one_block_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer-valued embeddings, so many items tie exactly: blocks of rows, merged, give the
    same rows in the same order (ties: lower row first) and scores as one pass, which is a
    stable sort of the allowed items' u·c."""
    rng = np.random.default_rng(3)
    users = np.round(rng.standard_normal((3, 4))).astype(np.float32)
    items = np.round(rng.standard_normal((20_000, 4))).astype(np.float32)
    rules = [Allowed(excluded=np.arange(0, 20_000, 7)), None,
             Allowed(mask=np.arange(20_000) % 2 == 0)]
    whole = retrieve(users, items, 300, rules)
    monkeypatch.setattr(ranking, "RETRIEVAL_BLOCK_BYTES", 4 * 4 * 3_000)  # 7 blocks
    in_blocks = retrieve(users, items, 300, rules)
    assert np.array_equal(whole[0], in_blocks[0])
    assert np.array_equal(whole[1], in_blocks[1])
    coarse = users @ items.T
    coarse[0, rules[0].excluded] = -np.inf
    coarse[2, ~(np.arange(20_000) % 2 == 0)] = -np.inf
    assert np.array_equal(whole[0], reference(coarse, 300))
