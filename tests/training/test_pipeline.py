"""The trained and exported model: signatures against Keras, the store layout, the trap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from service.model_format import (
    ITEM_EMBEDDING,
    METADATA_FILE,
    SCORE,
    SIGNATURES,
    TIME_EMBEDDING,
    USER_EMBEDDING,
    ModelSpec,
    version_dirs,
)
from service.serving.inputs import UserQuery, item_inputs, user_inputs
from service.training.evaluate import item_matrix, user_embeddings
from service.training.features import positive_sequences

TOLERANCE = 1e-5


def load_version(result):  # type: ignore[no-untyped-def]
    path = Path(result.version_dir)
    metadata = json.loads((path / METADATA_FILE).read_text())
    spec = ModelSpec.from_dict(metadata["model"])
    items = pd.read_parquet(path / "assets" / "items.parquet")
    users = pd.read_parquet(path / "assets" / "users.parquet")
    return tf.saved_model.load(str(path)), spec, items, users


@pytest.fixture(scope="module", params=["interaction", "seed", "fused"])
def exported(request, trained, trained_seed, trained_fused):  # type: ignore[no-untyped-def]
    result = {"interaction": trained, "seed": trained_seed, "fused": trained_fused}[
        request.param]
    return (result, *load_version(result))


def test_version_layout(trained) -> None:  # type: ignore[no-untyped-def]
    path = Path(trained.version_dir)
    assert path.name == "1"
    for name in ("saved_model.pb", "variables/variables.index", "metadata.json",
                 "assets/items.parquet", "assets/users.parquet", "assets/vocab_item_id.txt",
                 "learning_curves.png"):
        assert (path / name).is_file(), name
    metadata = json.loads((path / METADATA_FILE).read_text())
    for key in ("format_version", "created_at", "data", "feature_spec", "training",
                "evaluation", "model"):
        assert key in metadata
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    users = pd.read_parquet(path / "assets" / "users.parquet")
    assert {"user_id", "history"} <= set(users.columns)
    assert all(isinstance(h, (list, np.ndarray)) for h in users["history"])


def test_signatures_match_keras(exported) -> None:  # type: ignore[no-untyped-def]
    result, saved, spec, items, users = exported
    assert set(SIGNATURES) <= set(saved.signatures)
    keras_items = item_matrix(result.model, result.encoded)
    exported_items = saved.signatures["item_tower"](
        **item_inputs(spec.item_features, items.to_dict("list")))[ITEM_EMBEDDING].numpy()
    assert np.abs(exported_items - keras_items).max() < TOLERANCE

    sample = users.head(64)
    history = {u: [str(i) for i in h] for u, h in zip(sample["user_id"], sample["history"],
                                                      strict=True)}
    known = pd.DataFrame([(u, i, t, 1) for u, h in history.items() for t, i in enumerate(h)],
                         columns=["user_id", "item_id", "timestamp", "label"])
    sequences = positive_sequences(known, result.encoded.schema.item_ids)
    # Query times before, between, on and after the time buckets' boundaries (the seed model,
    # the write-up's, takes none).
    assert (spec.time_boundaries is None) == (spec.arch == "seed")
    bounds = np.asarray(spec.time_boundaries or [0.0])
    times = pd.Series(np.resize(np.concatenate([bounds - 1, bounds, bounds + 1,
                                                [bounds[-1] + 1e6]]), len(sample)))
    keras_users = user_embeddings(result.model, result.encoded, sample["user_id"], sequences,
                                  times)
    queries = [UserQuery(u, {n: r[n] for n in spec.user_features.names}, tuple(history[u]))
               for u, r in zip(sample["user_id"], sample.to_dict("records"), strict=True)]
    exported_users = saved.signatures["user_tower"](
        **user_inputs(spec.user_features, spec.history_length, queries))[USER_EMBEDDING].numpy()
    if spec.time_boundaries is not None:
        exported_users += saved.signatures["query_time"](
            query_time=tf.constant(times, tf.float64))[TIME_EMBEDDING].numpy()
    assert np.abs(exported_users - keras_users).max() < TOLERANCE

    logits = result.model.head(tf.constant(keras_users), tf.constant(keras_items[None].repeat(
        len(keras_users), axis=0)))
    scores = saved.signatures["score"](
        user_embedding=tf.constant(exported_users),
        item_embedding=tf.constant(exported_items[None].repeat(len(exported_users), axis=0)))
    assert np.abs(scores[SCORE].numpy() - tf.sigmoid(logits).numpy()).max() < TOLERANCE


def rankings(result) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Every user's full ranking of the catalog under the exported model."""
    saved, spec, items, users = load_version(result)
    columns = items.to_dict("list")
    matrix = saved.signatures["item_tower"](**item_inputs(spec.item_features, columns))[
        ITEM_EMBEDDING]
    queries = [UserQuery(u, {n: r[n] for n in spec.user_features.names},
                         tuple(str(i) for i in h))
               for u, h, r in zip(users["user_id"], users["history"], users.to_dict("records"),
                                  strict=True)][:100]
    embedded = saved.signatures["user_tower"](
        **user_inputs(spec.user_features, spec.history_length, queries))[USER_EMBEDDING]
    scores = saved.signatures["score"](
        user_embedding=embedded,
        item_embedding=tf.repeat(matrix[None], len(queries), axis=0))[SCORE].numpy()
    return np.argsort(-scores, axis=1, kind="stable")


def test_seed_model_gives_every_user_the_same_ranking(trained_seed) -> None:  # type: ignore[no-untyped-def]
    """The write-up's trap: Dense(1) over [u, c] is w_u·u + w_c·c + b, so the user only
    shifts every score by the same amount."""
    ranked = rankings(trained_seed)
    assert (ranked == ranked[0]).all()


def test_interaction_model_ranks_per_user(trained) -> None:  # type: ignore[no-untyped-def]
    ranked = rankings(trained)
    distinct_top10 = {tuple(r[:10]) for r in ranked}
    assert len(distinct_top10) > len(ranked) // 2


def test_report_has_model_and_baselines(trained) -> None:  # type: ignore[no-untyped-def]
    assert {"interaction (this model)", "popularity", "oracle (true probabilities)"} <= set(
        trained.metrics)
    for row in ("interaction (this model)", "oracle (true probabilities)"):
        assert 0.0 <= trained.metrics[row]["auc"] <= 1.0
    assert "full_hr@10" in trained.table


def test_versions_are_never_overwritten(tmp_path, synthetic_dataset) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import _train

    first = _train(tmp_path, synthetic_dataset, "seed")
    second = _train(tmp_path, synthetic_dataset, "seed")
    assert [n for n, _ in version_dirs(tmp_path / "default")] == [2, 1]
    assert first.version_dir != second.version_dir
