"""The classic peers of bench/quality.py: popularity, implicit's ALS and BPR.

Every peer is scored by the trainer's own code (service.training.evaluate / metrics) on the
trainer's own evaluation sets, so the sampled negatives, the excluded items and the tie rules
are exactly those of `recsys-train`:

* sampled: the score of the target and of its 99 negatives (`EvalSet.negatives`), rank =
  negatives scoring >= the target (pessimistic, `metrics.sampled_ranks`);
* full: `metrics.top_k_excluding` over the whole catalog with `EvalSet.exclude` (the user's
  positive rows of the part the model was fit on) left out.

ALS and BPR (implicit 0.7: `fit(user_items)` on a users x items CSR matrix) are tuned on the
validation split (fit on `train`, scored on the validation targets, best full NDCG@10, the
metric the project's early stopping watches), then refit with the chosen settings on train +
validation and scored once on the test targets. implicit's own `recommend(...,
filter_already_liked_items=True)` is run on the final model as a cross-check of the full
ranking.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.typing import NDArray

from service.data.dataset import ITEM_ID, LABEL, USER_ID
from service.training import evaluate, metrics
from service.training.evaluate import EvalSet

K = evaluate.K
RANKING = ("sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10")
SELECT_BY = "full_ndcg@10"

# Small grids, centred (one exploration on ML-100K's validation split) on where the best
# settings were; each fit takes 0.1-3 s on one core at ML-100K's size. With binary data,
# ALS's alpha is the weight of a positive cell against the unobserved ones.
ALS_GRID: dict[str, tuple[Any, ...]] = {
    "factors": (16, 32, 64),
    "regularization": (0.3, 1.0, 3.0),
    "alpha": (0.1, 0.3, 1.0),
    "iterations": (15, 30),
}
BPR_GRID: dict[str, tuple[Any, ...]] = {
    "factors": (16, 32, 64),
    "learning_rate": (0.003, 0.01, 0.03),
    "regularization": (0.001, 0.01),
    "iterations": (50, 100, 200),
}


@dataclass
class PeerResult:
    name: str
    test: dict[str, float]
    settings: dict[str, Any]
    validation: dict[str, float]
    seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


def ranking_only(values: Mapping[str, float]) -> dict[str, float]:
    return {name: float(values[name]) for name in RANKING}


def user_item_matrix(rows: pd.DataFrame, users: pd.Index, catalog: pd.Index) -> sp.csr_matrix:
    """Users x catalog, 1.0 where the user has a positive row (repeats count once)."""
    if LABEL in rows.columns:
        rows = rows.loc[rows[LABEL].to_numpy() == 1]
    user_rows = users.get_indexer(pd.Index(rows[USER_ID]))
    item_rows = catalog.get_indexer(pd.Index(rows[ITEM_ID]))
    keep = (user_rows >= 0) & (item_rows >= 0)
    matrix = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32),
                            (user_rows[keep], item_rows[keep])),
                           shape=(len(users), len(catalog)), dtype=np.float32)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def score_eval_set(scores: NDArray[np.float32], data: EvalSet) -> dict[str, float]:
    """The four ranking metrics of a [targets, catalog] score matrix, as the trainer computes
    them (same negatives, same exclusions, same ties)."""
    n_users = len(data.targets)
    rows = np.arange(n_users)
    pos = scores[rows, data.target_rows]
    neg = np.take_along_axis(scores, np.maximum(data.negatives, 0), axis=1)
    top = metrics.top_k_excluding(scores, data.exclude, K)
    return ranking_only(evaluate.ranking_metrics(pos, neg, top, data))


def popularity(known: pd.DataFrame, data: EvalSet) -> PeerResult:
    """Positive rows per item in `known`, through the trainer's own evaluate_popularity."""
    began = time.perf_counter()
    counts = metrics.popularity_scores(known, data.catalog)
    test = ranking_only(evaluate.evaluate_popularity(counts, data))
    return PeerResult("popularity", test, {"counts": "train + validation"}, {},
                      time.perf_counter() - began)


@dataclass
class FactorPeer:
    """One implicit model family: how to build it from settings."""

    name: str
    grid: Mapping[str, Sequence[Any]]
    build: Callable[..., Any]


def als_peer(seed: int, threads: int) -> FactorPeer:
    from implicit.cpu.als import AlternatingLeastSquares

    def build(**settings: Any) -> Any:
        return AlternatingLeastSquares(**settings, num_threads=threads, random_state=seed,
                                       calculate_training_loss=False)
    return FactorPeer("ALS", ALS_GRID, build)


def bpr_peer(seed: int, threads: int) -> FactorPeer:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    def build(**settings: Any) -> Any:
        return BayesianPersonalizedRanking(**settings, num_threads=threads, random_state=seed,
                                           verify_negative_samples=True)
    return FactorPeer("BPR", BPR_GRID, build)


def fit_and_score(peer: FactorPeer, settings: Mapping[str, Any], fit_on: sp.csr_matrix,
                  users: pd.Index, data: EvalSet) -> tuple[Any, dict[str, float]]:
    model = peer.build(**settings)
    model.fit(fit_on, show_progress=False)
    user_rows = users.get_indexer(pd.Index(data.targets[USER_ID]))
    scores = (np.asarray(model.user_factors)[user_rows]
              @ np.asarray(model.item_factors).T).astype(np.float32)
    return model, score_eval_set(scores, data)


def implicit_full_ranking(model: Any, fit_on: sp.csr_matrix, users: pd.Index,
                          data: EvalSet) -> tuple[float, float]:
    """Full HR@10 / NDCG@10 from implicit's own recommend(filter_already_liked_items=True)."""
    user_rows = users.get_indexer(pd.Index(data.targets[USER_ID]))
    ids, _ = model.recommend(user_rows, fit_on[user_rows], N=K,
                             filter_already_liked_items=True)
    return metrics.full_ranking_hits(np.asarray(ids), data.target_rows, K)


def tune_and_test(peer: FactorPeer, users: pd.Index, train: sp.csr_matrix,
                  known: sp.csr_matrix, validation: EvalSet, test: EvalSet,
                  progress: Callable[[str], None] = print) -> PeerResult:
    """Grid search on validation (fit on train), refit the best on train + validation, test."""
    began = time.perf_counter()
    names = list(peer.grid)
    grid: list[dict[str, Any]] = []
    for values in itertools.product(*(peer.grid[n] for n in names)):
        settings = dict(zip(names, values, strict=True))
        _, scores = fit_and_score(peer, settings, train, users, validation)
        grid.append({"settings": settings, "validation": scores})
    best = max(grid, key=lambda g: g["validation"][SELECT_BY])  # first of equals wins
    progress(f"  {peer.name}: {len(grid)} settings tried; best on validation "
             f"{format_settings(best['settings'])} (val full NDCG@10 "
             f"{best['validation'][SELECT_BY]:.4f})")
    model, scores = fit_and_score(peer, best["settings"], known, users, test)
    hr, ndcg = implicit_full_ranking(model, known, users, test)
    checks = {"implicit_recommend_full_hr@10": hr, "implicit_recommend_full_ndcg@10": ndcg}
    return PeerResult(peer.name, scores, dict(best["settings"]), dict(best["validation"]),
                      time.perf_counter() - began, grid, checks)


def format_settings(settings: Mapping[str, Any]) -> str:
    short = {"factors": "f", "regularization": "reg", "alpha": "alpha", "iterations": "it",
             "learning_rate": "lr"}
    return " ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else
                    f"{short.get(k, k)}={v}" for k, v in settings.items())
