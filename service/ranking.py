"""Top-k over a catalog: retrieval by inner product, then rerank with the model's head.

One implementation serves both the trainer's evaluation and the online service, so the numbers
the trainer reports are the numbers the service produces.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.model_format import RETRIEVAL_DOT

# head(user_embeddings [U, d], item_embeddings [U, M, d]) -> scores [U, M]
HeadFn = Callable[[NDArray[np.float32], NDArray[np.float32]], NDArray[np.float32]]
# propose(user_embeddings [U, d], n) -> about the n best items by u·c per user [U, n], -1 padded
ProposeFn = Callable[[NDArray[np.float32], int], NDArray[np.int64]]


@dataclass(frozen=True)
class Allowed:
    """The items one user may get: those of a catalog mask (filters; None: every item), less
    some rows (exclusions). Rows rather than a mask, so an exclusion costs its own size, not
    the catalog's."""

    mask: NDArray[np.bool_] | None = None
    excluded: NDArray[np.integer[Any]] = field(default_factory=lambda: np.zeros(0, np.intp))

    def rows_ok(self, rows: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which of these catalog rows are allowed."""
        ok = self.mask[rows] if self.mask is not None else np.ones(rows.shape, dtype=bool)
        return ok & ~np.isin(rows, self.excluded)


# scan(user_embedding [d], n, allowed) -> exactly what retrieve() gives that one user, rows [n]
# and u·c [n], reached a faster way; None when it cannot tell (retrieve() then computes it).
ScanFn = Callable[[NDArray[np.float32], int, Allowed | None],
                  tuple[NDArray[np.int64], NDArray[np.float32]] | None]

# How many items retrieval by u·c passes to the head, unless told otherwise: the service's
# setting and the trainer's evaluation share it, so the trainer's figures are the service's. On
# ml-100k the default model's HR@10 and NDCG@10 are the same from 25 to the whole catalog; on
# the synthetic data they fall as the depth grows (BENCHMARKS.md, tenth session).
RERANK_DEPTH = 100

# Below this many items a plain partial selection is as fast as anything.
SMALL_CATALOG = 8192
SAMPLE_SIZE = 2048
# The sampled threshold aims at this many times k survivors, so it rarely undershoots.
OVERSHOOT = 3


def top_k_indices(scores: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Column indices of the k largest scores per row, best first (ties: lower index first)."""
    return top_k_of_columns(scores.T, k)


def top_k_of_columns(scores: NDArray[np.float32], k: int,
                     columns: int | None = None) -> NDArray[np.int64]:
    """Per column of scores [N, U] (the retrieval's layout: one column per user), the row
    indices of its k largest scores, best first (ties: lower index first) -> [U, k]. Only the
    first ``columns`` columns when given (inner_products' padding follows them).

    Large columns are first cut by a threshold read off a strided sample (one vectorised
    compare), so the partial selection runs on a few hundred survivors instead of the whole
    catalog: 6x faster at 100k items. Exact: every item above the threshold survives, and a
    column with fewer than k survivors falls back to the whole column.
    """
    n, n_cols = scores.shape[0], scores.shape[1] if columns is None else columns
    k = min(k, n)
    out = np.zeros((n_cols, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    survivors = _survivors(scores, k, n_cols)
    for col in range(n_cols):
        values = scores[:, col]
        candidates = survivors[col] if survivors is not None else np.arange(n)
        if len(candidates) < k:
            candidates = np.arange(n)
        if len(candidates) > k:
            candidates = best_k(candidates, values[candidates], k)
        out[col] = candidates[np.lexsort((candidates, -values[candidates]))]
    return out


def _survivors(scores: NDArray[np.float32], k: int,
               n_cols: int) -> list[NDArray[np.int64]] | None:
    """Per column of the first n_cols, the rows whose score reaches a threshold that about
    OVERSHOOT·k of them reach, ascending (None: columns too short to bother)."""
    n, width = scores.shape
    if n <= SMALL_CATALOG or OVERSHOOT * k * 4 >= n:
        return None
    sample = scores[:: n // SAMPLE_SIZE, :n_cols]
    rows_in_sample = sample.shape[0]
    rank_in_sample = min(rows_in_sample, int(np.ceil(OVERSHOOT * k * rows_in_sample / n)) + 1)
    position = rows_in_sample - rank_in_sample
    thresholds = np.full(width, np.inf, dtype=scores.dtype)  # columns past n_cols: none
    thresholds[:n_cols] = np.partition(sample, position, axis=0)[position]
    # flatnonzero over the matrix's own memory order: 10x faster than np.nonzero on 2-D.
    if scores.flags.c_contiguous:  # [N, W] in memory: flat index = row * W + col
        rows, cols = np.divmod(reaching(scores, thresholds), width)
        order = np.argsort(cols, kind="stable")  # rows stay ascending within a column
        rows, cols = rows[order], cols[order]
    else:  # any other layout, e.g. [U, N] in memory (a transposed view)
        cols, rows = np.divmod(np.flatnonzero((scores >= thresholds).T), n)
    bounds = np.searchsorted(cols, np.arange(n_cols + 1))
    return [rows[bounds[c]:bounds[c + 1]] for c in range(n_cols)]


# Values per folded line in `reaching`.
FOLD = 1024


def reaching(scores: NDArray[np.float32], thresholds: NDArray[np.float32]) -> NDArray[np.intp]:
    """Flat indices (row * W + col) of the C-contiguous scores [N, W] that reach their
    column's threshold [W]. Compared as is, numpy's inner loop would run over one row's W
    values at a time; rows folded into lines of about FOLD values, against the thresholds
    tiled as often, run long vectorised loops: 100k x 8 0.82 -> 0.44 ms."""
    n, width = scores.shape
    fold = max(1, FOLD // width)
    whole = n - n % fold
    lines = scores[:whole].reshape(-1, fold * width) >= np.tile(thresholds, fold)
    rest = scores[whole:] >= thresholds
    return np.concatenate([np.flatnonzero(lines), np.flatnonzero(rest) + whole * width])


def best_k(candidates: NDArray[np.int64], values: NDArray[np.float32],
           k: int) -> NDArray[np.int64]:
    """The k candidates (ascending indices) with the largest values; among values equal to the
    k-th largest, the lowest indices, so results never depend on partitioning order."""
    kth = np.partition(values, len(values) - k)[len(values) - k]
    above = candidates[values > kth]
    tied = candidates[values == kth]
    return np.concatenate([above, tied[:k - len(above)]])


def padded_width(users: int) -> int:
    """How many users' columns a product is computed for: OpenBLAS's sgemm runs whole blocks
    of 8 (or 4) columns fast and a ragged remainder slowly, so padding with zero users costs
    less than it adds. 100k x 64 items: 7 users 3.78 ms, padded to 8 2.28 ms; 13 users 4.00 ms,
    padded to 16 2.74 ms; 2 users 1.87 ms, padded to 4 2.00 ms (so not padded)."""
    if users <= 2:
        return users
    return 4 if users <= 4 else -(-users // 8) * 8


# A lone user's product over this many items or more is split across the cores: it is
# memory-bound, and two cores read nearly twice as fast (one user against 100k x 64: 1.02 ->
# 0.65 ms; against 1M: 12.4 -> 9.8 ms). A batch of users means concurrent requests, which keep
# the other cores busy already: split, its threads' handoffs cost more than they saved.
PARALLEL_MIN_ITEMS = 50_000


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                 thread_name_prefix="inner-products")


def inner_products(users: NDArray[np.float32], items: NDArray[np.float32]
                   ) -> NDArray[np.float32]:
    """items @ users.T, C-contiguous [N, W]: one column per user, then W - U columns of
    zeros when a batch is padded (see padded_width).

    This way round, not users @ items.T: OpenBLAS took 10 ms for 16 users against 100k x 64
    items that way and 3 ms this way (1.4 ms for one user either way). A lone user's large
    product goes in row blocks on parallel threads (BLAS releases the GIL; each call stays
    single-threaded under OPENBLAS_NUM_THREADS=1)."""
    n_users = users.shape[0]
    if n_users > 1:  # before os.cpu_count() (6 us): batches are the throughput path
        padded = np.zeros((padded_width(n_users), users.shape[1]), dtype=users.dtype)
        padded[:n_users] = users
        return items @ padded.T
    if items.shape[0] < PARALLEL_MIN_ITEMS or (workers := os.cpu_count() or 1) == 1:
        return items @ users.T
    out = np.empty((items.shape[0], users.shape[0]), dtype=np.float32)
    bounds = np.linspace(0, items.shape[0], workers + 1).astype(int)
    list(_pool().map(lambda b: np.matmul(items[b[0]:b[1]], users.T, out=out[b[0]:b[1]]),
                     itertools.pairwise(bounds)))
    return out


# A batch's products over a large catalog are computed, and cut to each user's best, a block of
# rows at a time, so that a batch never holds its whole [items x users] score matrix: at 1M
# items, 32 users' scores are 128 MB (a 1M server under 32 connections peaked 180 MB above its
# idle RSS; with 32 MB blocks, 59 to 115 MB). Below this many bytes (100k items: any batch of
# up to 40 users; 1M: up to 4 users) there is one block.
RETRIEVAL_BLOCK_BYTES = 16 << 20


def retrieve(user_embeddings: NDArray[np.float32], item_matrix: NDArray[np.float32], n: int,
             allowed: Sequence[Allowed | None], scan: ScanFn | None = None,
             ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Per user, the n best allowed items by u·c (best first, ties: lower row first) and their
    u·c, -inf for a slot past a user's allowed items: rows [U, n'] and scores [U, n'], n' =
    min(n, items). A lone user goes through ``scan`` first, when given."""
    n_users = user_embeddings.shape[0]
    if scan is not None and n_users == 1 and (found := scan(user_embeddings[0], n,
                                                            allowed[0])) is not None:
        return found[0][None], found[1][None]
    width = padded_width(n_users) if n_users > 1 else 1
    block = max(n, RETRIEVAL_BLOCK_BYTES // (4 * width))
    parts = [_best_in_rows(user_embeddings, item_matrix, start, start + block, n, allowed)
             for start in range(0, item_matrix.shape[0], block)]
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    # Each block's best hold the whole catalog's (an item among the n best overall is among
    # its block's n best); the same order picks them.
    order = np.lexsort((rows, -scores))[:, :n]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _best_in_rows(user_embeddings: NDArray[np.float32], item_matrix: NDArray[np.float32],
                  start: int, stop: int, n: int, allowed: Sequence[Allowed | None],
                  ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """retrieve() over the catalog rows start..stop-1 (catalog row numbers)."""
    n_users = user_embeddings.shape[0]
    coarse = inner_products(user_embeddings, item_matrix[start:stop])  # [rows, >= U]
    for user, rule in enumerate(allowed):
        if rule is not None:
            if rule.mask is not None:
                coarse[~rule.mask[start:stop], user] = -np.inf
            excluded = rule.excluded
            coarse[excluded[(excluded >= start) & (excluded < stop)] - start, user] = -np.inf
    rows = top_k_of_columns(coarse, n, n_users)
    return rows + start, coarse[rows, np.arange(n_users)[:, None]]


def rank(user_embeddings: NDArray[np.float32], item_matrix: NDArray[np.float32], k: int,
         head: HeadFn, retrieval: str = RETRIEVAL_DOT, depth: int = RERANK_DEPTH,
         allowed: Sequence[Allowed | None] | None = None, propose: ProposeFn | None = None,
         scan: ScanFn | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The k best items per user: item indices [U, k] and head scores [U, k].

    ``allowed`` (one per user, None: every item) masks out excluded or filtered items. Slots
    with no allowed item left have index -1 and score -inf. With dot retrieval the best
    max(depth, k) items by u·c are reranked by the head; "exhaustive" retrieval scores every
    item with the head. ``propose`` (an approximate index) replaces the exact u·c retrieval,
    unless its candidates leave some user fewer than k allowed items. ``scan`` is a faster
    way to the exact retrieval's own result for a lone user (see retrieve).
    """
    n_users, n_items = user_embeddings.shape[0], item_matrix.shape[0]
    allowed = allowed if allowed is not None else [None] * n_users
    proposed = (proposed_candidates(propose, user_embeddings, max(depth, k), k, allowed)
                if propose is not None and retrieval == RETRIEVAL_DOT else None)
    if proposed is not None:
        candidates, valid = proposed
    elif retrieval == RETRIEVAL_DOT:
        candidates, coarse_scores = retrieve(user_embeddings, item_matrix, max(depth, k),
                                             allowed, scan)
        valid = np.isfinite(coarse_scores)
    else:
        candidates = np.broadcast_to(np.arange(n_items, dtype=np.int64), (n_users, n_items))
        valid = np.ones((n_users, n_items), dtype=bool)
        for user, rule in enumerate(allowed):
            if rule is not None:
                valid[user] = rule.rows_ok(candidates[user])
    fine = head_scores(head, user_embeddings, item_matrix, candidates)
    np.copyto(fine, np.float32(-np.inf), where=~valid)
    best = top_k_indices(fine, k)
    scores = np.take_along_axis(fine, best, axis=1)
    indices = np.where(np.isfinite(scores), np.take_along_axis(candidates, best, axis=1), -1)
    return indices, scores


def head_scores(head: HeadFn, user_embeddings: NDArray[np.float32],
                item_matrix: NDArray[np.float32], candidates: NDArray[np.int64],
                ) -> NDArray[np.float32]:
    """The head's score of each user's candidates [U, M], in blocks of candidates whose item
    embeddings stay within RETRIEVAL_BLOCK_BYTES: the exhaustive retrieval's candidates are the
    whole catalog, and [U, M, d] for 32 users over 100k items is 820 MB. A reranking's few
    hundred candidates are one block."""
    n_users, width = candidates.shape
    block = max(1, RETRIEVAL_BLOCK_BYTES // (4 * item_matrix.shape[1] * max(n_users, 1)))
    return np.concatenate(
        [np.asarray(head(user_embeddings, item_matrix[candidates[:, start:start + block]]),
                    dtype=np.float32) for start in range(0, max(width, 1), block)], axis=1)


def proposed_candidates(propose: ProposeFn, user_embeddings: NDArray[np.float32], n: int,
                        k: int, allowed: Sequence[Allowed | None],
                        ) -> tuple[NDArray[np.int64], NDArray[np.bool_]] | None:
    """An approximate index's candidates and which of them are allowed; None when some user
    would be left with fewer than k (a narrow filter): the exact retrieval then runs."""
    candidates = propose(user_embeddings, n)
    valid = candidates >= 0
    candidates = np.where(valid, candidates, 0)
    for user, rule in enumerate(allowed):
        if rule is not None:
            valid[user] &= rule.rows_ok(candidates[user])
    if (valid.sum(axis=1) < k).any():
        return None
    return candidates, valid
