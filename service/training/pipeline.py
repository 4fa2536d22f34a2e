"""One training run: split, features, train (one model or several fused into one), evaluate
beside the baselines, export."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from service.data.dataset import ITEM_ID, LABEL, USER_ID, Dataset, FeatureSpec
from service.model_format import FORMAT_VERSION, RETRIEVAL_DOT, RETRIEVAL_EXHAUSTIVE, ModelSpec
from service.ranking import RERANK_DEPTH
from service.training import evaluate, metrics
from service.training.distribution import is_chief, worker_count, workers_note
from service.training.example_input import (
    USERS_PER_SHARD,
    ExampleSource,
    InMemoryExamples,
    write_shards,
)
from service.training.export import ExportBundle, export_version, user_table
from service.training.features import (
    BUCKET_SUFFIX,
    POPULARITY,
    FeatureSchema,
    fit_feature_schema,
    training_examples,
    with_popularity,
)
from service.training.model import (
    ARCH_SEED,
    ModelConfig,
    Recommender,
    build_recommender,
    fuse,
    history_encoder_for,
    members_for,
)
from service.training.report import format_table, plot_learning_curves
from service.training.split import Split, leave_last_out, sort_by_time
from service.training.trainer import TrainConfig, Trainer, TrainResult

LABELLED_HOLDOUT_FRACTION = 0.2
VALIDATION_USERS = 2000
COLUMNS = ["sampled_hr@10", "sampled_ndcg@10", "full_hr@10", "full_ndcg@10", "auc", "logloss"]
# Member i of an ensemble trains with seed + i * MEMBER_SEED_STRIDE (member 0 with the run's
# seed, so it is the model a one-member run trains).
MEMBER_SEED_STRIDE = 1000


@dataclass(frozen=True)
class RunOptions:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    history_length: int = 50
    rerank_depth: int = RERANK_DEPTH
    # Stream the training examples from Parquet shards on disk instead of holding them in
    # memory (example_input.py); always on under a multi-worker strategy.
    stream_examples: bool = False
    # Export several members fused even when validation prefers one of them alone.
    always_fuse: bool = False


@dataclass
class RunResult:
    version_dir: Path | None  # None on a worker other than the chief, which exports nothing
    metrics: dict[str, dict[str, float]]
    table: str
    model: Recommender
    encoded: evaluate.Encoded


def encode_tables(schema: FeatureSchema, users: pd.DataFrame,
                  items: pd.DataFrame) -> evaluate.Encoded:
    item_features = schema.items.encode(items)
    item_features["item_id"] = schema.item_ids.encode(items[ITEM_ID])
    return evaluate.Encoded(schema, users, schema.users.encode(users), item_features)


def run(dataset: Dataset, store: Path, name: str, options: RunOptions,
        progress: Callable[[str], None] = print,
        strategy: tf.distribute.Strategy | None = None) -> RunResult:
    """Trains and exports one version. Under a multi-worker ``strategy`` every worker runs this
    on the same data; they train together and the chief alone evaluates on the test and
    exports."""
    strategy = strategy or tf.distribute.get_strategy()
    with tempfile.TemporaryDirectory(prefix="recsys-examples-") as scratch:
        return _run(dataset, store, name, options, progress, strategy, Path(scratch))


def _run(dataset: Dataset, store: Path, name: str, options: RunOptions,
         progress: Callable[[str], None], strategy: tf.distribute.Strategy,
         scratch: Path) -> RunResult:
    if options.model.history_encoder is None:
        options = replace(options, model=replace(
            options.model, history_encoder=history_encoder_for(dataset.has_labels)))
    if options.model.members is None:
        options = replace(options, model=replace(
            options.model, members=members_for(options.model.arch, dataset.has_labels)))
    fraction = LABELLED_HOLDOUT_FRACTION if dataset.has_labels else 0.0
    split = leave_last_out(dataset.interactions, fraction)
    progress(f"split: {len(split.train)} train, {len(split.validation)} validation, "
             f"{len(split.test)} test rows; {len(split.test_items)} test users")
    items = with_popularity(dataset.items, split.train)
    item_spec = replace(dataset.item_features,
                        numeric=(*dataset.item_features.numeric, POPULARITY))
    schema = fit_feature_schema(split.train, dataset.users, items, dataset.user_features,
                                item_spec, options.history_length,
                                time_buckets_for(options.model, dataset.has_time))
    encoded = encode_tables(schema, dataset.users, items)
    catalog = pd.Index(items[ITEM_ID])
    with strategy.scope():
        first = build_model(options.model, schema)
    known_for_test = pd.concat([split.train, split.validation], ignore_index=True)
    validation = evaluate.make_eval_set(
        split.validation_items, split.train, dataset.interactions,
        split.validation if dataset.has_labels else None, catalog, schema,
        options.train.seed, max_users=VALIDATION_USERS)
    source = example_source(split.train, dataset.users, items, schema, options, strategy,
                            scratch)
    monitor = "val_auc" if dataset.has_labels else "val_full_ndcg@10"
    progress(f"training {options.model.arch} on {source.rows} examples"
             f"{workers_note(strategy)}")

    def validate(m: Recommender) -> dict[str, float]:
        return prefixed(evaluate.evaluate_model(m, encoded, validation, options.rerank_depth))

    def train(member: Recommender, seed: int) -> TrainResult:
        trainer = Trainer(member, replace(options.train, seed=seed), encoded.user_features,
                          encoded.item_features, dataset.has_labels, strategy)
        return trainer.fit(source, validate, monitor, progress)

    members, fitted = train_members(first, options, schema, strategy, train, progress)
    if not is_chief(strategy):
        return RunResult(None, {}, "", fuse(members), encoded)
    model, validated, kept = fuse_if_better(members, fitted, validate, monitor,
                                            options.always_fuse, progress)
    test = evaluate.make_eval_set(
        split.test_items, known_for_test, dataset.interactions,
        split.test if dataset.has_labels else None, catalog, schema, options.train.seed)
    results = {
        f"{options.model.arch} (this model)":
            evaluate.evaluate_model(model, encoded, test, options.rerank_depth),
        "popularity": evaluate.evaluate_popularity(
            # Counted over all the model may know at test time (train + validation).
            metrics.popularity_scores(known_for_test, catalog), test),
    }
    oracle = evaluate.evaluate_oracle(test)
    if oracle:
        results["oracle (true probabilities)"] = oracle
    table = format_table(results, COLUMNS)
    progress(table)
    bundle = ExportBundle(
        model=model, schema=schema,
        spec=ModelSpec(options.model.arch,
                       RETRIEVAL_EXHAUSTIVE if options.model.arch == ARCH_SEED else RETRIEVAL_DOT,
                       embedding_dim(model), options.history_length, dataset.user_features,
                       item_spec, schema.time_boundaries if model.query_time else None),
        items=items, users=user_table(dataset.users, histories(known_for_test)),
        metadata=metadata(dataset, item_spec, split, options, results, validated, fitted,
                          kept),
        extra_files=learning_curves(fitted))
    version_dir = export_version(bundle, store, name)
    progress(f"exported {version_dir}")
    return RunResult(version_dir, results, table, model, encoded)


def member_seed(seed: int, index: int) -> int:
    return seed + index * MEMBER_SEED_STRIDE


def train_members(first: Recommender, options: RunOptions, schema: FeatureSchema,
                  strategy: tf.distribute.Strategy,
                  train: Callable[[Recommender, int], TrainResult],
                  progress: Callable[[str], None]) -> tuple[list[Recommender], list[TrainResult]]:
    """Trains ``options.model.members`` models one after the other, each with its own seed
    (initialisation, dropout, example order) and its own early stopping. ``first`` was built
    under the caller's random state, so a one-member run is exactly the model it always was."""
    count = options.model.members or 1
    members, fitted = [first], []
    for index in range(count):
        seed = member_seed(options.train.seed, index)
        if index:
            keras.utils.set_random_seed(seed)  # the members must differ, reproducibly
            with strategy.scope():
                members.append(build_model(options.model, schema))
        if count > 1:
            progress(f"member {index + 1}/{count} (seed {seed})")
        fitted.append(train(members[index], seed))
    return members, fitted


def fuse_if_better(members: list[Recommender], fitted: list[TrainResult],
                   validate: Callable[[Recommender], dict[str, float]], monitor: str,
                   always: bool = False, progress: Callable[[str], None] = print,
                   ) -> tuple[Recommender, dict[str, float], list[int]]:
    """The members fused, unless the best member alone scores at least as well on validation
    (``monitor``): then that member, at half the serving cost. An unlucky member (one that
    early stopping cut short) can drag the fusion below its partner. Returns the model, its
    validation metrics and the indices of the members it holds."""
    fused = fuse(members)
    validated = validate(fused)
    if len(members) == 1:
        return fused, validated, [0]
    alone = [best_value(r, monitor) for r in fitted]
    best = max(range(len(alone)), key=lambda i: -np.inf if np.isnan(alone[i]) else alone[i])
    shown = ", ".join(f"{v:.4f}" for v in alone)
    if always or validated[monitor] > alone[best]:
        progress(f"{len(members)} members fused: {monitor}={validated[monitor]:.4f} "
                 f"(each alone: {shown})")
        return fused, validated, list(range(len(members)))
    progress(f"kept member {best + 1} alone: {monitor}={alone[best]:.4f}, fused "
             f"{validated[monitor]:.4f} (each alone: {shown})")
    # Its weights are those of the epoch early stopping kept: that epoch's validation.
    return members[best], {key: best_value(fitted[best], key) for key in fitted[best].history
                           if key.startswith("val_")}, [best]


def best_value(fitted: TrainResult, monitor: str) -> float:
    """The monitored validation value of the epoch early stopping kept (nan if none was)."""
    values = fitted.history.get(monitor, [])
    return values[fitted.best_epoch - 1] if 0 < fitted.best_epoch <= len(values) else np.nan


def best_validation(fitted: TrainResult) -> dict[str, float | None]:
    """A member's validation metrics at the epoch early stopping kept."""
    return {key.removeprefix("val_"): none_if_nan(best_value(fitted, key))
            for key in fitted.history if key.startswith("val_")}


def example_source(train: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                   schema: FeatureSchema, options: RunOptions, strategy: tf.distribute.Strategy,
                   scratch: Path) -> ExampleSource:
    workers = worker_count(strategy)
    if not options.stream_examples and workers == 1:
        return InMemoryExamples(training_examples(train, users, items, schema))
    users_per_shard = max(1, min(USERS_PER_SHARD, train[USER_ID].nunique() // workers))
    return write_shards(train, users, items, schema, scratch, options.train.seed,
                        users_per_shard)


def time_buckets_for(config: ModelConfig, has_time: bool) -> int:
    """The query time's buckets: none for the seed model (the write-up's) or for data whose
    timestamps are only the rows' order."""
    return config.query_time_buckets if has_time and config.arch != ARCH_SEED else 0


def build_model(config: ModelConfig, schema: FeatureSchema) -> Recommender:
    vocab_sizes: dict[str, int] = {}
    for table, table_schema in (("user", schema.users), ("item", schema.items)):
        vocab_sizes.update({f"{table}:{n}": len(v) for n, v in table_schema.vocabularies.items()})
        vocab_sizes.update({f"{table}:{n}{BUCKET_SUFFIX}": s.n_buckets
                            for n, s in table_schema.numeric.items()})
    boundaries = schema.time_boundaries
    return build_recommender(config, schema.users.spec, schema.items.spec, vocab_sizes,
                             len(schema.user_ids), len(schema.item_ids), schema.history_length,
                             len(boundaries) + 1 if boundaries is not None else 0)


def embedding_dim(model: Recommender) -> int:
    return int(model.item_tower.output_dim)


def prefixed(values: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": v for k, v in values.items()}


def histories(known: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's training positives, oldest first (the user table's history column)."""
    ordered = sort_by_time(known[known[LABEL] > 0])
    return {str(user): group.astype(str).tolist()
            for user, group in ordered.groupby(USER_ID, sort=False)[ITEM_ID]}


def learning_curves(fitted: list[TrainResult]) -> dict[str, bytes]:
    """learning_curves.png for the (first) member, learning_curves_<n>.png for the others."""
    return {"learning_curves.png" if n == 1 else f"learning_curves_{n}.png": curves_png(r.history)
            for n, r in enumerate(fitted, start=1)}


def curves_png(history: dict[str, list[float]]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.png"
        plot_learning_curves(history, path)
        return path.read_bytes()


def metadata(dataset: Dataset, item_spec: FeatureSpec, split: Split, options: RunOptions,
             results: dict[str, dict[str, float]], validated: dict[str, float],
             fitted: list[TrainResult], kept: list[int]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"name": dataset.name, "source": dataset.source,
                 "users": int(dataset.interactions[USER_ID].nunique()),
                 "items": len(dataset.items), "interactions": len(dataset.interactions),
                 "has_labels": dataset.has_labels,
                 "train_rows": len(split.train), "validation_rows": len(split.validation),
                 "test_rows": len(split.test)},
        "feature_spec": {"user": dataset.user_features.to_dict(),
                         "item": item_spec.to_dict(),
                         "history_length": options.history_length},
        "training": {"model": asdict(options.model), "train": asdict(options.train),
                     # One number for one model; one per member for an ensemble.
                     "best_epoch": (fitted[0].best_epoch if len(fitted) == 1
                                    else [r.best_epoch for r in fitted]),
                     "seconds": round(sum(r.seconds for r in fitted), 1),
                     "members": [{"seed": member_seed(options.train.seed, n),
                                  "best_epoch": r.best_epoch, "seconds": round(r.seconds, 1),
                                  "validation": best_validation(r), "exported": n in kept}
                                 for n, r in enumerate(fitted)],
                     "tensorflow": tf.__version__, "rerank_depth": options.rerank_depth},
        "evaluation": {"protocol": "leave-last-out by time; sampled = 99 uniform negatives; "
                                   "full = whole catalog minus the user's training items",
                       "test_users": len(split.test_items),
                       # The exported model (the members it holds fused) on validation.
                       "validation": {k.removeprefix("val_"): none_if_nan(v)
                                      for k, v in validated.items()},
                       "metrics": {k: {m: none_if_nan(v) for m, v in r.items()}
                                   for k, r in results.items()}},
    }


def none_if_nan(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)
