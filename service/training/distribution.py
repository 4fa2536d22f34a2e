"""Training on several machines: TensorFlow's MultiWorkerMirroredStrategy, set up from TF_CONFIG.

Every worker runs the same `recsys-train` command on the same data; the chief (the "chief" task,
else worker 0) alone evaluates on the test and exports.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf


def strategy_from_environment() -> tf.distribute.Strategy | None:
    """The multi-worker strategy when TF_CONFIG names a cluster, else None (one process).
    Must run before any TensorFlow operation, as TensorFlow requires."""
    if not os.environ.get("TF_CONFIG"):
        return None
    return tf.distribute.MultiWorkerMirroredStrategy()


def cluster_spec(strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """The TF_CONFIG cluster of a multi-worker strategy; {} for one process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return dict(resolver.cluster_spec().as_dict()) if resolver is not None else {}


def worker_count(strategy: tf.distribute.Strategy) -> int:
    spec = cluster_spec(strategy)
    return max(1, len(spec.get("chief", [])) + len(spec.get("worker", [])))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    spec = cluster_spec(strategy)
    if not spec:
        return True
    resolver = strategy.cluster_resolver
    has_chief = "chief" in spec
    return bool(resolver.task_type == "chief"
                or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0))


def workers_note(strategy: tf.distribute.Strategy) -> str:
    replicas = strategy.num_replicas_in_sync
    return f" on {replicas} replicas ({type(strategy).__name__})" if replicas > 1 else ""
