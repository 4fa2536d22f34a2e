"""The query time's vectors as the service looks them up, against the version's query_time
signature that defines them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from service.model_format import TIME_EMBEDDING
from service.serving.loader import read_metadata
from service.serving.query_time import QueryTimeVectors


def test_lookup_equals_the_signature(version_dir: Path) -> None:
    saved = tf.saved_model.load(str(version_dir))
    _, spec = read_metadata(version_dir)
    assert spec.time_boundaries is not None
    signature = saved.signatures["query_time"]
    vectors = QueryTimeVectors(spec.time_boundaries, signature)
    bounds = np.asarray(spec.time_boundaries)
    times = np.concatenate([bounds - 0.5, bounds, bounds + 0.5, [0.0, -1e9, 4e9],
                            np.random.default_rng(0).uniform(bounds[0] - 1e5, bounds[-1] + 1e5,
                                                             200)])
    want = signature(query_time=tf.constant(times, tf.float64))[TIME_EMBEDDING].numpy()
    np.testing.assert_array_equal(vectors(times), want)
    # Every bucket has its own vector (the tiny model trained them away from zero).
    assert len({row.tobytes() for row in vectors.vectors}) == len(bounds) + 1
