"""Exact retrieval for a lone user through an 8-bit copy of the item matrix.

One user's u·c over the catalog is bound by memory bandwidth: the float32 matrix is read whole
for a few flops per value. Faiss scans an 8-bit copy (a quarter of the bytes, per dimension
scaled to [-127, 127]) for a few more candidates than asked, their u·c is then computed exactly
from the float32 rows, and the result is kept only when it is provably the exact one: the
copy's error on any item's u·c is bounded (``bound``), so an item left out scores at most
the last candidate's approximate score plus that bound. When the n-th best exact score is
above it, no item left out can reach the n best; otherwise the caller runs the float32 product.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.ranking import PARALLEL_MIN_ITEMS, Allowed

# Candidates searched beyond the n asked: with these, every one of 300 users of the
# benchmark's model was proven, at 100k items (n = 100 and 200) and at 1M (n = 200).
EXTRA_SHARE = 0.5
EXTRA_MIN = 64
# Smaller catalogs are not worth a copy: their float32 product runs from the cache, quicker than
# the scan (one user, k 100: 30k items 0.20 against 0.30 ms; 60k 0.64 to 0.81 against 0.53 to
# 0.59 ms).
MIN_ITEMS = PARALLEL_MIN_ITEMS
# Quantised and added to the index a block of rows at a time: the scaled rows and the float64
# error check are copies (4 MB and 8 MB a block).
BLOCK_ROWS = 16384
# Float32 rounding of a d-term dot product is at most about d · 2^-24 of Σ|u_j c_j|; four
# times that covers the copy's, the query scaling's and the float32 product's alike.
ROUNDING = 4 * 2.0 ** -24
LEVEL = 127.0


class QuantizedScan:
    """A ranking.ScanFn over ``matrix`` (kept, not copied)."""

    def __init__(self, matrix: NDArray[np.float32]) -> None:
        import faiss  # the library's 8-bit scan; imported only where one is built

        count, dim = matrix.shape
        self.matrix, self.count, self.dim = matrix, count, dim
        peak = np.zeros(dim, dtype=np.float32)
        for start in range(0, count, BLOCK_ROWS):
            np.maximum(peak, np.abs(matrix[start:start + BLOCK_ROWS]).max(axis=0), out=peak)
        # Each dimension scaled to [-LEVEL, LEVEL], where one 8-bit range fits them all
        # (Faiss's uniform quantiser, its fastest scan); a query times step undoes it.
        self.scale = (LEVEL / np.where(peak > 0, peak, 1)).astype(np.float32)
        self.step = (1 / self.scale).astype(np.float32)
        self.peak = peak.astype(np.float64)
        self.error = np.zeros(dim, dtype=np.float64)  # the copy's, per dimension, any item
        # One shard per core, searched on parallel threads (as ranking.inner_products splits
        # a lone user's product): 1M items 5.9 -> 3.2 ms. One for a small matrix (tests).
        shards = (os.cpu_count() or 1) if count >= PARALLEL_MIN_ITEMS else 1
        bounds = np.linspace(0, count, shards + 1).astype(int)
        self._shards = [self._shard(faiss, matrix[a:b]) for a, b in itertools.pairwise(bounds)]
        self.index = self._shards[0]
        if len(self._shards) > 1:
            # threaded, ids running on from shard to shard (a SWIG overload mypy misses)
            self.index = faiss.IndexShards(dim, True, True)  # type: ignore[call-arg]
            for shard in self._shards:
                self.index.add_shard(shard)

    def _shard(self, faiss: Any, rows: NDArray[np.float32]) -> Any:
        index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit_uniform,
                                           faiss.METRIC_INNER_PRODUCT)
        index.train(np.array([[-LEVEL] * self.dim, [LEVEL] * self.dim], dtype=np.float32))
        # Sized once: grown by each add, the codes would be copied into ever larger buffers.
        index.codes.resize(len(rows) * index.code_size)
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start:start + BLOCK_ROWS]
            index.add(block * self.scale)
            decoded = index.reconstruct_n(start, len(block)).astype(np.float64) * self.step
            np.maximum(self.error, np.abs(block - decoded).max(axis=0), out=self.error)
        return index

    @property
    def nbytes(self) -> int:
        return sum(int(shard.code_size) * int(shard.ntotal) for shard in self._shards)

    def bound(self, user: NDArray[np.float32]) -> float:
        """How far the copy's u·c can be from the float32 one, for any item."""
        weights = np.abs(user.astype(np.float64))
        return float(weights @ self.error + ROUNDING * self.dim * (weights @ self.peak))

    def __call__(self, user: NDArray[np.float32], n: int,
                 allowed: Allowed | None) -> tuple[NDArray[np.int64], NDArray[np.float32]] | None:
        """The n best allowed rows of the catalog by u·c (best first, ties: lower row) and
        their float32 u·c, for one user [d]; None when the copy cannot prove them exact (then
        the float32 product decides)."""
        if allowed is not None and allowed.mask is not None:
            return None  # a filter may leave few of any candidates: the product is as quick
        excluded = allowed.excluded if allowed is not None else np.zeros(0, np.intp)
        wanted = n + max(EXTRA_MIN, int(n * EXTRA_SHARE)) + len(excluded)
        if 2 * wanted > self.count or not np.isfinite(user).all():
            return None
        approximate, rows = self.index.search((user * self.step)[None], wanted)
        rows = rows[0]
        if rows[-1] < 0:  # fewer items than asked
            return None
        floor = float(approximate[0, -1])  # what any item left out scores at most
        if len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        exact = self.matrix[rows] @ user
        order = np.lexsort((rows, -exact))[:n]
        if len(order) < n or not exact[order[-1]] > floor + self.bound(user):
            return None
        return rows[order], exact[order]
