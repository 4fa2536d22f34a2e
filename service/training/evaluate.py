"""Scores models under the leave-last-out protocol (see split.py and metrics.py).

The model is evaluated the way it is served: user embeddings from the user tower with the
user's known history, the item matrix from the item tower, and service.ranking for the top-10
(retrieval by u·c, rerank by the head), so trainer and service report the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from numpy.typing import NDArray

from service.data.dataset import ITEM_ID, LABEL, TIMESTAMP, TRUE_PROBABILITY, USER_ID
from service.model_format import time_buckets
from service.ranking import RERANK_DEPTH, Allowed, rank
from service.training import metrics
from service.training.features import FeatureSchema, PositiveSequences, positive_sequences
from service.training.model import ARCH_SEED, Recommender

USER_CHUNK = 256
K = 10


@dataclass
class EvalSet:
    """One evaluation phase (validation or test): its targets and the users' known past."""

    targets: pd.DataFrame          # user_id, item_id: the ranking target per user
    known: pd.DataFrame            # interactions the model may see (history, exclusions)
    pointwise: pd.DataFrame | None  # labelled data: the held-out rows with their labels
    negatives: NDArray[np.int64]   # [U, 99] sampled negatives per target (catalog index, -1 pad)
    target_rows: NDArray[np.int64]  # [U] catalog index of each target
    exclude: metrics.UserItemSets   # per target user: catalog indices of known positives
    sequences: PositiveSequences
    catalog: pd.Index              # item ids in item-matrix row order


def make_eval_set(targets: pd.DataFrame, known: pd.DataFrame, everything: pd.DataFrame,
                  pointwise: pd.DataFrame | None, catalog: pd.Index, schema: FeatureSchema,
                  seed: int, max_users: int | None = None) -> EvalSet:
    targets = targets[targets[ITEM_ID].isin(catalog)]
    if max_users is not None and len(targets) > max_users:
        targets = targets.sample(max_users, random_state=seed).sort_values(USER_ID)
    targets = targets.reset_index(drop=True)
    exclude = metrics.UserItemSets.from_interactions(known, targets[USER_ID], catalog,
                                                     positives_only=True)
    return EvalSet(
        targets=targets, known=known, pointwise=pointwise,
        negatives=metrics.sample_negatives(targets, everything, catalog, n=99, seed=seed),
        target_rows=catalog.get_indexer(pd.Index(targets[ITEM_ID])).astype(np.int64),
        exclude=exclude, sequences=positive_sequences(known, schema.item_ids), catalog=catalog)


@dataclass
class Encoded:
    """The encoded tables the towers read (same arrays the trainer uses)."""

    schema: FeatureSchema
    users: pd.DataFrame
    user_features: dict[str, NDArray[Any]]
    item_features: dict[str, NDArray[Any]]


def item_matrix(model: Recommender, encoded: Encoded, batch: int = 8192) -> NDArray[np.float32]:
    n = len(next(iter(encoded.item_features.values())))
    parts = [model.item_tower({k: v[s:s + batch] for k, v in encoded.item_features.items()})
             for s in range(0, n, batch)]
    return np.concatenate([p.numpy() for p in parts]).astype(np.float32)


def user_embeddings(model: Recommender, encoded: Encoded, user_ids: pd.Series,
                    sequences: PositiveSequences, times: pd.Series) -> NDArray[np.float32]:
    """u of each user at the query time ``times`` (the target interaction's, as a request
    made then would carry it)."""
    rows = pd.Index(encoded.users[USER_ID]).get_indexer(user_ids)
    inputs = {k: v[rows] for k, v in encoded.user_features.items()}
    inputs["user_id"] = encoded.schema.user_ids.encode(user_ids)
    length = encoded.schema.history_length
    inputs["history"] = np.stack([sequences.history(u, length) for u in user_ids]) \
        if len(user_ids) else np.zeros((0, length), np.int32)
    boundaries = encoded.schema.time_boundaries
    inputs["time_bucket"] = time_buckets(times, boundaries) if boundaries is not None \
        else np.zeros(len(user_ids), np.int32)
    return np.asarray(model.users(inputs), dtype=np.float32)


def head_scores(model: Recommender) -> Callable[[NDArray[np.float32], NDArray[np.float32]],
                                                NDArray[np.float32]]:
    def score(users: NDArray[np.float32], items: NDArray[np.float32]) -> NDArray[np.float32]:
        logits = model.head(tf.constant(users), tf.constant(items))
        return np.asarray(tf.sigmoid(logits), dtype=np.float32)
    return score


def chunks(n: int, size: int = USER_CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate_model(model: Recommender, encoded: Encoded, data: EvalSet,
                   depth: int = RERANK_DEPTH) -> dict[str, float]:
    items = item_matrix(model, encoded)
    head = head_scores(model)
    retrieval = "exhaustive" if model.config.arch == ARCH_SEED else "dot"
    users = user_embeddings(model, encoded, data.targets[USER_ID], data.sequences,
                            data.targets[TIMESTAMP])
    pos, neg, top = [], [], []
    for part in chunks(len(users)):
        u = users[part]
        pos.append(head(u, items[data.target_rows[part]][:, None, :])[:, 0])
        neg.append(head(u, items[np.maximum(data.negatives[part], 0)]))
        allowed = [Allowed(excluded=data.exclude.row(user))
                   for user in range(part.start, part.stop)]
        top.append(rank(u, items, K, head, retrieval, depth, allowed)[0])
    result = ranking_metrics(np.concatenate(pos) if pos else np.zeros(0),
                             np.concatenate(neg) if neg else np.zeros((0, 99)),
                             np.concatenate(top) if top else np.zeros((0, K), np.int64), data)
    if data.pointwise is not None:
        result.update(pointwise_metrics(model, encoded, data, items, head))
    return result


def ranking_metrics(pos: NDArray[Any], neg: NDArray[Any], top: NDArray[np.int64],
                    data: EvalSet) -> dict[str, float]:
    valid = data.negatives >= 0
    ranks = metrics.sampled_ranks(pos, neg, valid)
    hr, ndcg = metrics.full_ranking_hits(top, data.target_rows, K)
    out = {"sampled_hr@10": metrics.hit_rate_at_k(ranks, K),
           "sampled_ndcg@10": metrics.ndcg_at_k(ranks, K),
           "full_hr@10": hr, "full_ndcg@10": ndcg}
    if data.pointwise is None:
        labels, scores = metrics.sampled_pointwise(pos, neg, valid)
        out.update(auc=metrics.auc(labels, scores), logloss=metrics.logloss(labels, scores))
    return out


def pointwise_metrics(model: Recommender, encoded: Encoded, data: EvalSet,
                      items: NDArray[np.float32],
                      head: Callable[[NDArray[np.float32], NDArray[np.float32]],
                                     NDArray[np.float32]]) -> dict[str, float]:
    rows = data.pointwise
    assert rows is not None
    item_rows = data.catalog.get_indexer(pd.Index(rows[ITEM_ID]))
    scores = np.zeros(len(rows), dtype=np.float32)
    for part in chunks(len(rows), 4096):
        u = user_embeddings(model, encoded, rows[USER_ID].iloc[part], data.sequences,
                            rows[TIMESTAMP].iloc[part])
        scores[part] = head(u, items[item_rows[part]][:, None, :])[:, 0]
    labels = rows[LABEL].to_numpy()
    return {"auc": metrics.auc(labels, scores), "logloss": metrics.logloss(labels, scores)}


def evaluate_popularity(counts: NDArray[np.float64], data: EvalSet) -> dict[str, float]:
    scores = counts.astype(np.float32)
    n_users = len(data.targets)
    pos = scores[data.target_rows]
    neg = scores[np.maximum(data.negatives, 0)] if n_users else np.zeros((0, 99))
    top = metrics.top_k_of_one_ranking(scores, data.exclude, K)
    result = ranking_metrics(pos, neg, top, data)
    result.pop("logloss", None)  # counts are no probabilities
    if data.pointwise is not None:
        # Counts rank but are no probabilities: AUC only, no logloss.
        rows = data.catalog.get_indexer(pd.Index(data.pointwise[ITEM_ID]))
        result["auc"] = metrics.auc(data.pointwise[LABEL].to_numpy(),
                                    np.where(rows >= 0, scores[rows], 0.0))
    return result


def evaluate_oracle(data: EvalSet) -> dict[str, float]:
    """Synthetic data: the metrics of the true click probabilities (the best achievable)."""
    rows = data.pointwise
    if rows is None or TRUE_PROBABILITY not in rows.columns:
        return {}
    labels, probs = rows[LABEL].to_numpy(), rows[TRUE_PROBABILITY].to_numpy()
    return {"auc": metrics.auc(labels, probs), "logloss": metrics.logloss(labels, probs)}
