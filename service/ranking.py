"""Top-k over a catalog: retrieval by inner product, then rerank with the model's head.

One implementation serves both the trainer's evaluation and the online service, so the numbers
the trainer reports are the numbers the service produces.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from service.model_format import RETRIEVAL_DOT

# head(user_embeddings [U, d], item_embeddings [U, M, d]) -> scores [U, M]
HeadFn = Callable[[NDArray[np.float32], NDArray[np.float32]], NDArray[np.float32]]
# propose(user_embeddings [U, d], n) -> about the n best items by u·c per user [U, n], -1 padded
ProposeFn = Callable[[NDArray[np.float32], int], NDArray[np.int64]]


# Below this many columns a plain partial selection is as fast as anything.
SMALL_CATALOG = 8192
SAMPLE_SIZE = 2048
# The sampled threshold aims at this many times k survivors, so it rarely undershoots.
OVERSHOOT = 3


def top_k_indices(scores: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Column indices of the k largest scores per row, best first (ties: lower index first).

    Large rows are first cut by a threshold read off a strided sample (a vectorised compare),
    so the partial selection runs on a few hundred survivors instead of the whole catalog: 6x
    faster at 100k columns. Exact: every item above the threshold survives, and a row with
    fewer than k survivors falls back to the whole row.
    """
    n_rows, n = scores.shape
    k = min(k, n)
    out = np.zeros((n_rows, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    thresholds = sampled_thresholds(scores, k)
    for row in range(n_rows):
        values = scores[row]
        candidates = (np.flatnonzero(values >= thresholds[row]) if thresholds is not None
                      else np.arange(n))
        if len(candidates) < k:
            candidates = np.arange(n)
        if len(candidates) > k:
            candidates = best_k(candidates, values[candidates], k)
        out[row] = candidates[np.lexsort((candidates, -values[candidates]))]
    return out


def best_k(candidates: NDArray[np.int64], values: NDArray[np.float32],
           k: int) -> NDArray[np.int64]:
    """The k candidates (ascending indices) with the largest values; among values equal to the
    k-th largest, the lowest indices, so results never depend on partitioning order."""
    kth = np.partition(values, len(values) - k)[len(values) - k]
    above = candidates[values > kth]
    tied = candidates[values == kth]
    return np.concatenate([above, tied[:k - len(above)]])


def sampled_thresholds(scores: NDArray[np.float32], k: int) -> NDArray[np.float32] | None:
    """Per row, a score that about OVERSHOOT·k items reach (None: rows too short to bother)."""
    n = scores.shape[1]
    if n <= SMALL_CATALOG or OVERSHOOT * k * 4 >= n:
        return None
    sample = scores[:, :: n // SAMPLE_SIZE]
    width = sample.shape[1]
    rank_in_sample = min(width, int(np.ceil(OVERSHOOT * k * width / n)) + 1)
    return np.partition(sample, width - rank_in_sample, axis=1)[:, width - rank_in_sample]


# From this catalog size on, the matrix product is split across the cores: a query against
# 1M items reads 256 MB (memory-bound), and two cores read nearly twice as fast.
PARALLEL_MIN_ITEMS = 500_000


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                 thread_name_prefix="inner-products")


def inner_products(users: NDArray[np.float32], items: NDArray[np.float32]
                   ) -> NDArray[np.float32]:
    """users @ items.T; large ones in row blocks of the catalog on parallel threads (BLAS
    releases the GIL; each call stays single-threaded under OPENBLAS_NUM_THREADS=1)."""
    workers = os.cpu_count() or 1
    if workers == 1 or items.shape[0] < PARALLEL_MIN_ITEMS:
        return users @ items.T
    bounds = np.linspace(0, items.shape[0], workers + 1).astype(int)
    parts = _pool().map(lambda b: users @ items[b[0]:b[1]].T, itertools.pairwise(bounds))
    return np.concatenate(list(parts), axis=1)


def rank(user_embeddings: NDArray[np.float32], item_matrix: NDArray[np.float32], k: int,
         head: HeadFn, retrieval: str = RETRIEVAL_DOT, depth: int = 200,
         allowed: NDArray[np.bool_] | None = None, propose: ProposeFn | None = None,
         ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The k best items per user: item indices [U, k] and head scores [U, k].

    ``allowed`` [U, N] (or [N]) masks out excluded or filtered items. Slots with no allowed item
    left have index -1 and score -inf. With dot retrieval the best max(depth, k) items by u·c
    are reranked by the head; "exhaustive" retrieval scores every item with the head.
    ``propose`` (an approximate index) replaces the exact u·c retrieval, unless its candidates
    leave some user fewer than k allowed items.
    """
    n_users, n_items = user_embeddings.shape[0], item_matrix.shape[0]
    proposed = (proposed_candidates(propose, user_embeddings, max(depth, k), k, allowed)
                if propose is not None and retrieval == RETRIEVAL_DOT else None)
    if proposed is not None:
        candidates, valid = proposed
    elif retrieval == RETRIEVAL_DOT:
        coarse = inner_products(user_embeddings, item_matrix)
        if allowed is not None:
            np.copyto(coarse, np.float32(-np.inf), where=~allowed)  # in place: no [U, N] copy
        candidates = top_k_indices(coarse, max(depth, k))
        valid = np.isfinite(np.take_along_axis(coarse, candidates, axis=1))
    else:
        candidates = np.broadcast_to(np.arange(n_items, dtype=np.int64), (n_users, n_items))
        valid = (np.ones((n_users, n_items), dtype=bool) if allowed is None
                 else np.broadcast_to(allowed, (n_users, n_items)))
    fine = np.array(head(user_embeddings, item_matrix[candidates]), dtype=np.float32)
    np.copyto(fine, np.float32(-np.inf), where=~valid)
    best = top_k_indices(fine, k)
    scores = np.take_along_axis(fine, best, axis=1)
    indices = np.where(np.isfinite(scores), np.take_along_axis(candidates, best, axis=1), -1)
    return indices, scores


def proposed_candidates(propose: ProposeFn, user_embeddings: NDArray[np.float32], n: int,
                        k: int, allowed: NDArray[np.bool_] | None,
                        ) -> tuple[NDArray[np.int64], NDArray[np.bool_]] | None:
    """An approximate index's candidates and which of them are allowed; None when some user
    would be left with fewer than k (a narrow filter): the exact retrieval then runs."""
    candidates = propose(user_embeddings, n)
    valid = candidates >= 0
    candidates = np.where(valid, candidates, 0)
    if allowed is not None:
        mask = np.broadcast_to(allowed, (len(candidates), allowed.shape[-1]))
        valid &= np.take_along_axis(mask, candidates, axis=1)
    if (valid.sum(axis=1) < k).any():
        return None
    return candidates, valid
