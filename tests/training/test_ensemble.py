"""Several trained models fused into one: the fusion's arithmetic, and a fused version as the
trainer exports it (implicit feedback, where the default trains two members). That its
signatures compute the fused Keras model is checked with the others in test_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from service.data.dataset import FeatureSpec
from service.model_format import METADATA_FILE
from service.training.evaluate import item_matrix
from service.training.model import (
    ARCH_INTERACTION,
    ARCH_SEED,
    HISTORY_ATTENTION,
    ModelConfig,
    Recommender,
    build_recommender,
    fuse,
    members_for,
)
from service.training.pipeline import MEMBER_SEED_STRIDE, fuse_if_better
from service.training.trainer import TrainResult
from tests.training.conftest import train_implicit

LENGTH = 6
N_ITEMS = 20
N_USERS = 5
TIME_BUCKETS = 4
TOLERANCE = 1e-5


def member(seed: int) -> Recommender:
    import keras

    keras.utils.set_random_seed(seed)
    config = ModelConfig(embedding_dim=8, id_dim=8, user_id_dim=8, hidden_dim=16,
                         head_hidden=(8,), history_encoder=HISTORY_ATTENTION)
    model = build_recommender(config, FeatureSpec(), FeatureSpec(), {}, N_USERS, N_ITEMS, LENGTH,
                              TIME_BUCKETS)
    towers(model)  # builds the variables
    assert model.query_time is not None
    # The query time's vectors start at zero: random ones, so the fusion must carry them.
    table = model.query_time.table.embeddings
    table.assign(np.random.default_rng(seed).normal(size=table.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def members() -> list[Recommender]:
    return [member(1), member(2)]


def towers(model: Recommender) -> tuple[np.ndarray, np.ndarray]:
    users = {"user_id": np.arange(N_USERS, dtype=np.int32),
             "history": np.random.default_rng(0).integers(0, N_ITEMS, (N_USERS, LENGTH),
                                                          dtype=np.int32),
             "time_bucket": np.arange(N_USERS, dtype=np.int32) % TIME_BUCKETS}
    items = {"item_id": np.arange(N_ITEMS, dtype=np.int32)}
    return np.asarray(model.users(users)), np.asarray(model.item_tower(items))


def test_fused_towers_are_the_members_side_by_side(members: list[Recommender]) -> None:
    fused = fuse(members)
    assert fused.user_tower.output_dim == fused.item_tower.output_dim == 16
    u, c = towers(fused)
    parts = [towers(m) for m in members]
    np.testing.assert_allclose(u, np.concatenate([p[0] for p in parts], axis=1), atol=1e-6)
    np.testing.assert_allclose(c, np.concatenate([p[1] for p in parts], axis=1), atol=1e-6)
    # Retrieval's u·c is the sum of the members' dot products.
    np.testing.assert_allclose(u @ c.T, sum(pu @ pc.T for pu, pc in parts), atol=1e-4)


def test_fused_head_is_the_mean_of_the_members_logits(members: list[Recommender]) -> None:
    fused = fuse(members)
    u, c = towers(fused)
    grid = np.broadcast_to(c, (len(u), *c.shape))
    logits = np.asarray(fused.head(tf.constant(u), tf.constant(grid)))
    alone = []
    for m in members:
        mu, mc = towers(m)
        alone.append(np.asarray(m.head(tf.constant(mu),
                                       tf.constant(np.broadcast_to(mc, (len(mu), *mc.shape))))))
    np.testing.assert_allclose(logits, np.mean(alone, axis=0), atol=1e-5)


def test_one_member_is_returned_as_it_is(members: list[Recommender]) -> None:
    assert fuse(members[:1]) is members[0]


def fitted(monitored: float) -> TrainResult:
    return TrainResult(history={"val_full_ndcg@10": [0.0, monitored, 0.0]}, best_epoch=2)


@pytest.mark.parametrize(("fused_value", "kept"), [(0.30, [0, 1]), (0.25, [1]), (0.20, [1])])
def test_the_fusion_is_kept_only_when_validation_prefers_it(
        members: list[Recommender], fused_value: float, kept: list[int]) -> None:
    """Fused members must beat the best member alone on validation, else that member is
    exported alone (ties too: it serves at half the cost)."""

    def validate(model: Recommender) -> dict[str, float]:
        fused = model.item_tower.output_dim > members[0].item_tower.output_dim
        return {"val_full_ndcg@10": fused_value if fused else -1.0}

    model, _validated, chosen = fuse_if_better(members, [fitted(0.2), fitted(0.25)], validate,
                                               "val_full_ndcg@10", progress=lambda _line: None)
    assert chosen == kept
    assert model.item_tower.output_dim == 8 * len(kept)
    if kept == [1]:
        assert model is members[1]
    forced = fuse_if_better(members, [fitted(0.2), fitted(0.25)], validate,
                            "val_full_ndcg@10", always=True, progress=lambda _line: None)
    assert forced[2] == [0, 1]


def test_the_data_chooses_the_number_of_members() -> None:
    assert members_for(ARCH_INTERACTION, has_labels=False) == 2
    assert members_for(ARCH_INTERACTION, has_labels=True) == 1
    assert members_for(ARCH_SEED, has_labels=False) == 1


# -- a fused version, trained and exported ----------------------------------------------------

def test_implicit_data_trains_two_members_by_default(trained_fused) -> None:  # type: ignore[no-untyped-def]
    path = Path(trained_fused.version_dir)
    metadata = json.loads((path / METADATA_FILE).read_text())
    training = metadata["training"]
    assert training["model"]["members"] == 2
    assert [m["seed"] for m in training["members"]] == [0, MEMBER_SEED_STRIDE]
    assert len(training["best_epoch"]) == 2
    assert "full_ndcg@10" in training["members"][1]["validation"]
    assert metadata["model"]["embedding_dim"] == 2 * ModelConfig().embedding_dim
    assert "full_ndcg@10" in metadata["evaluation"]["validation"]
    assert (path / "learning_curves.png").is_file() and (path / "learning_curves_2.png").is_file()
    assert [m["exported"] for m in training["members"]] == [True, True]


def test_the_first_member_is_the_one_member_model(tmp_path, synthetic_dataset,  # type: ignore[no-untyped-def]
                                                  trained_fused) -> None:
    """Member 1 trains under the run's seed as a one-member run would, so fusing adds
    members to the model a run always trained instead of replacing it."""
    single = train_implicit(tmp_path, synthetic_dataset, 1)
    first = trained_fused.model.item_tower.towers[0]
    np.testing.assert_allclose(
        item_matrix(single.model, single.encoded),
        item_matrix(trained_fused.model, trained_fused.encoded)[:, :first.output_dim],
        atol=TOLERANCE)
