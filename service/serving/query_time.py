"""The query time's part of a user embedding (training/model.py's QueryTime): one vector per
time bucket, read from the version's query_time signature once, so a request adds it to u
with a lookup instead of a TensorFlow call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from service.model_format import TIME_EMBEDDING, time_buckets


class QueryTimeVectors:
    def __init__(self, boundaries: tuple[float, ...], signature: Any) -> None:
        self.boundaries = boundaries
        # One time inside each bucket: before the first boundary, then each boundary itself
        # (a bucket starts at its boundary).
        inside = np.array([boundaries[0] - 1.0, *boundaries] if boundaries else [0.0])
        vectors = signature(query_time=tf.constant(inside, tf.float64))[TIME_EMBEDDING]
        self.vectors: NDArray[np.float32] = np.asarray(vectors, dtype=np.float32)

    def __call__(self, times: Sequence[float]) -> NDArray[np.float32]:
        """[len(times), d]: the vector of each time's bucket (Unix seconds)."""
        return self.vectors[time_buckets(times, self.boundaries)]
