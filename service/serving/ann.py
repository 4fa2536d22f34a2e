"""Approximate retrieval (RECSYS_RETRIEVAL_INDEX=ivf): a Faiss inverted-file index over the
item matrix, for catalogs where the exact product over every item is the bottleneck.

The index only proposes candidates by u·c; the head still reranks them against the exact item
matrix, so the scores served are the model's own. Vectors are stored as 8-bit scalars (a
quarter of the matrix), and the search scans the `nprobe` lists nearest to each user.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

# k-means on a sample: Faiss asks for at least 39 points per list, more buys little.
TRAIN_POINTS_PER_LIST = 40
ADD_ROWS = 65536


class ApproximateIndex:
    def __init__(self, matrix: NDArray[np.float32], nprobe: int, seed: int = 0) -> None:
        import faiss  # optional: the exact default never imports it

        count, dim = matrix.shape
        self.lists = max(1, min(4096, int(math.sqrt(count))))
        quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFScalarQuantizer(quantizer, dim, self.lists,
                                                   faiss.ScalarQuantizer.QT_8bit,
                                                   faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        sample = np.random.default_rng(seed).choice(
            count, min(count, self.lists * TRAIN_POINTS_PER_LIST), replace=False)
        self.index.train(np.ascontiguousarray(matrix[np.sort(sample)]))
        for start in range(0, count, ADD_ROWS):  # in blocks: Faiss's buffers grow with a call
            self.index.add(np.ascontiguousarray(matrix[start:start + ADD_ROWS]))
        self.index.nprobe = min(nprobe, self.lists)
        self._quantizer = quantizer  # the index does not own it from Python's side

    def search(self, users: NDArray[np.float32], n: int) -> NDArray[np.int64]:
        """The (about) n items with the largest u·c per user, best first; -1 pads a row when
        the probed lists hold fewer than n items."""
        _, rows = self.index.search(np.ascontiguousarray(users, dtype=np.float32), n)
        return np.asarray(rows, dtype=np.int64)
