"""Top-k over a catalog: retrieval by inner product, then rerank with the model's head.

One implementation serves both the trainer's evaluation and the online service, so the numbers
the trainer reports are the numbers the service produces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from service.model_format import RETRIEVAL_DOT

# head(user_embeddings [U, d], item_embeddings [U, M, d]) -> scores [U, M]
HeadFn = Callable[[NDArray[np.float32], NDArray[np.float32]], NDArray[np.float32]]


def top_k_indices(scores: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Column indices of the k largest scores per row, best first (ties: lower index first).

    A partial selection (argpartition) then a sort of only the k selected: O(N + k log k).
    """
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    part.sort(axis=1)  # makes the stable sort below break ties by index
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def rank(user_embeddings: NDArray[np.float32], item_matrix: NDArray[np.float32], k: int,
         head: HeadFn, retrieval: str = RETRIEVAL_DOT, depth: int = 200,
         allowed: NDArray[np.bool_] | None = None,
         ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The k best items per user: item indices [U, k] and head scores [U, k].

    ``allowed`` [U, N] (or [N]) masks out excluded or filtered items. Slots with no allowed item
    left have index -1 and score -inf. With dot retrieval the best max(depth, k) items by u·c
    are reranked by the head; "exhaustive" retrieval scores every item with the head.
    """
    n_users, n_items = user_embeddings.shape[0], item_matrix.shape[0]
    if retrieval == RETRIEVAL_DOT:
        coarse = user_embeddings @ item_matrix.T
        if allowed is not None:
            coarse = np.where(allowed, coarse, -np.inf).astype(np.float32)
        candidates = top_k_indices(coarse, max(depth, k))
        valid = np.isfinite(np.take_along_axis(coarse, candidates, axis=1))
    else:
        candidates = np.broadcast_to(np.arange(n_items, dtype=np.int64), (n_users, n_items))
        valid = (np.ones((n_users, n_items), dtype=bool) if allowed is None
                 else np.broadcast_to(allowed, (n_users, n_items)))
    fine = np.asarray(head(user_embeddings, item_matrix[candidates]), dtype=np.float32)
    fine = np.where(valid, fine, -np.inf).astype(np.float32)
    best = top_k_indices(fine, k)
    scores = np.take_along_axis(fine, best, axis=1)
    indices = np.where(np.isfinite(scores), np.take_along_axis(candidates, best, axis=1), -1)
    return indices, scores
