"""Stored users' embeddings: computed once per version, in bulk after the switch or on a
user's first request, and always the user tower's own output for that user."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.serving.inputs import UserQuery
from service.serving.servable import ServingModel
from service.serving.user_embeddings import FILL_BATCH, UserEmbeddings

from .helpers import make_settings, ok_json, started_client


def test_the_first_value_stays() -> None:
    store = UserEmbeddings(4, 2)
    assert store.get(1) is None
    store.put([1, 3], np.array([[1, 1], [3, 3]], np.float32))
    store.put([0, 1], np.array([[0, 0], [9, 9]], np.float32))
    assert store.matrix[[0, 1]].tolist() == [[0, 0], [1, 1]]
    assert store.get(2) is None and store.known.tolist() == [True, True, False, True]


def test_fill_computes_only_unknown_rows_in_batches_and_stops_when_told() -> None:
    users = FILL_BATCH * 2 + 3
    store = UserEmbeddings(users, 1)
    store.put([5], np.array([[-1]], np.float32))
    asked: list[list[int]] = []

    def embed(batch: list[int]) -> np.ndarray:
        asked.append(batch)
        return np.array(batch, np.float32)[:, None]

    assert store.fill(((row, row) for row in range(users)), embed) == users - 1
    assert all(len(batch) <= FILL_BATCH for batch in asked)
    assert 5 not in {row for batch in asked for row in batch}
    assert store.matrix[:, 0].tolist() == [-1 if r == 5 else r for r in range(users)]

    stopped = UserEmbeddings(users, 1)
    assert stopped.fill(((row, row) for row in range(users)), embed,
                        keep_going=lambda: False) == 0
    assert not stopped.known.any()


def served(client: TestClient) -> ServingModel:
    model = client.app.state.manager.current  # type: ignore[attr-defined]
    assert model is not None
    return model


def wait_all_known(model: ServingModel, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not model.user_embeddings.known.all():
        assert time.monotonic() < deadline, "the stored users were not all computed"
        time.sleep(0.05)


def test_every_stored_user_is_computed_after_the_switch_as_the_tower_computes_them_alone(
        model_store: Path, redis_url: str) -> None:
    with started_client(make_settings(model_store, redis_url)) as client:
        model = served(client)
        wait_all_known(model)
        for user_id, user in list(model.users.items())[:: max(1, len(model.users) // 20)]:
            alone = model.user_tower([UserQuery(user_id, user.features, user.history)])[0]
            np.testing.assert_allclose(model.user_embeddings.matrix[user.row], alone, atol=1e-5)


def test_without_the_bulk_pass_a_user_is_computed_on_the_first_request_only(
        model_store: Path, redis_url: str) -> None:
    with started_client(make_settings(model_store, redis_url, precompute_users=False)) as client:
        model = served(client)
        time.sleep(0.5)
        assert not model.user_embeddings.known.any()
        user_id, user = next(iter(model.users.items()))
        first = ok_json(client.post("/v1/recommend", json={"user": {"id": user_id}, "k": 5}))
        assert model.user_embeddings.known.sum() == 1 and model.user_embeddings.known[user.row]
        kept = model.user_embeddings.matrix[user.row].copy()
        again = ok_json(client.post("/v1/recommend", json={"user": {"id": user_id}, "k": 5}))
        assert again == first
        np.testing.assert_array_equal(model.user_embeddings.matrix[user.row], kept)
        # A request's own features make another user: computed, never kept as the stored one.
        spec = model.spec.user_features
        override = {spec.numeric[0]: 1.5} if spec.numeric else {spec.categorical[0]: "zz"}
        item = model.item_index.ids_at(np.array([0]))[0]
        got = ok_json(client.post("/v1/score", json={
            "user": {"id": user_id, "features": override}, "item_ids": [item],
            "context": {"time": 1_700_000_000}}))
        other = model.embed([UserQuery(user_id, {**user.features, **override}, user.history,
                                       time=1_700_000_000)])
        want = model.head(other, model.item_matrix[[0]][None])[0, 0]
        assert got["scores"][0]["score"] == np.float32(want).item()
        assert model.user_embeddings.known.sum() == 1
        np.testing.assert_array_equal(model.user_embeddings.matrix[user.row], kept)


def test_at_most_limit_users_are_kept() -> None:
    store = UserEmbeddings(10, 1, limit=3)
    store.put([0, 1], np.array([[0], [1]], np.float32))
    store.put([1, 2, 3, 4], np.array([[9], [2], [3], [4]], np.float32))
    assert store.known.tolist() == [True, True, True] + [False] * 7 and store.full
    assert store.matrix[:3, 0].tolist() == [0, 1, 2]
    fresh = UserEmbeddings(FILL_BATCH * 3, 1, limit=FILL_BATCH + 1)
    fresh.fill(((row, row) for row in range(FILL_BATCH * 3)),
               lambda batch: np.array(batch, np.float32)[:, None])
    assert fresh.kept == FILL_BATCH + 1 and fresh.known.sum() == FILL_BATCH + 1


def test_users_beyond_the_limit_are_computed_on_every_request(model_store: Path,
                                                              redis_url: str) -> None:
    with started_client(make_settings(model_store, redis_url, precompute_users=False)) as client:
        model = served(client)
        model.user_embeddings = UserEmbeddings(len(model.users), model.spec.embedding_dim,
                                               limit=1)
        (first_id, first), (second_id, second) = list(model.users.items())[:2]
        for user_id in (first_id, second_id, second_id):
            got = ok_json(client.post("/v1/recommend", json={"user": {"id": user_id}, "k": 3}))
            assert len(got["items"]) == 3
        known = model.user_embeddings.known
        assert known[first.row] and not known[second.row]
        # The second user, never kept, still gets what the tower computes for them alone.
        item = model.item_index.ids_at(np.array([0]))[0]
        got = ok_json(client.post("/v1/score", json={"user": {"id": second_id},
                                                     "item_ids": [item],
                                                     "context": {"time": 1_700_000_000}}))
        alone = model.embed([UserQuery(second_id, second.features, second.history,
                                       time=1_700_000_000)])
        want = model.head(alone, model.item_matrix[[0]][None])[0, 0]
        assert got["scores"][0]["score"] == np.float32(want).item()
