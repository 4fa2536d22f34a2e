"""top_k_indices and rank against numpy's full argsort, on sizes that take both code paths."""

from __future__ import annotations

import numpy as np
import pytest

from service.model_format import RETRIEVAL_DOT, RETRIEVAL_EXHAUSTIVE
from service.ranking import PARALLEL_MIN_ITEMS, inner_products, rank, top_k_indices


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
    got, want = top_k_indices(scores, k), reference(scores, k)
    finite = np.isfinite(np.take_along_axis(scores, want, axis=1))
    assert np.array_equal(np.where(finite, got, -1), np.where(finite, want, -1))


@pytest.mark.parametrize("retrieval", [RETRIEVAL_DOT, RETRIEVAL_EXHAUSTIVE])
def test_rank_with_full_depth_is_a_brute_force_ranking(retrieval: str) -> None:
    rng = np.random.default_rng(0)
    users = rng.standard_normal((4, 8)).astype(np.float32)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    weights = rng.standard_normal(8).astype(np.float32)

    def head(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ud,umd->um", u, c) + c @ weights

    allowed = rng.random((4, 300)) > 0.3
    indices, scores = rank(users, items, 10, head, retrieval, depth=300, allowed=allowed)
    full = np.where(allowed, head(users, np.broadcast_to(items, (4, 300, 8))), -np.inf)
    assert np.array_equal(indices, reference(full.astype(np.float32), 10))
    assert np.allclose(scores, np.take_along_axis(full, indices, axis=1), atol=1e-5)


def test_parallel_inner_products_equal_the_plain_product() -> None:
    rng = np.random.default_rng(3)
    users = rng.standard_normal((8, 16)).astype(np.float32)
    items = rng.standard_normal((PARALLEL_MIN_ITEMS + 123, 16)).astype(np.float32)
    assert np.allclose(inner_products(users, items), users @ items.T, atol=1e-5)


def test_rank_with_proposed_candidates_and_its_fallback() -> None:
    """A proposer's candidates replace the exact retrieval, padded slots and disallowed items
    dropped; when they leave a user fewer than k allowed items, the exact retrieval runs."""
    rng = np.random.default_rng(5)
    users = rng.standard_normal((3, 8)).astype(np.float32)
    items = rng.standard_normal((400, 8)).astype(np.float32)

    def head(u: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ud,umd->um", u, c)

    allowed = rng.random((3, 400)) > 0.2
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

    assert (~allowed[:, :12]).any(axis=1).any()
    fallback = rank(users, items, 10, head, RETRIEVAL_DOT, depth=50, allowed=allowed,
                    propose=poor)
    assert calls == [50]
    assert np.array_equal(fallback[0], exact[0])
