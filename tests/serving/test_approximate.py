"""RECSYS_RETRIEVAL_INDEX=ivf: the Faiss index finds the exact neighbours when it probes every
list, and the service answers through it exactly as without it on a small catalog."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from service.serving.ann import ApproximateIndex
from tests.serving.helpers import make_settings, ok_json, started_client


def test_index_recall_on_clustered_vectors() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    matrix = (centres[rng.integers(0, 50, 20_000)]
              + 0.3 * rng.standard_normal((20_000, 16))).astype(np.float32)
    users = rng.standard_normal((40, 16)).astype(np.float32)
    exact = np.argsort(-(users @ matrix.T), axis=1)[:, :10]
    index = ApproximateIndex(matrix, nprobe=1_000_000)
    assert index.index.nprobe == index.lists  # capped: every list is probed
    found = index.search(users, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.9, recall  # 8-bit codes reorder near-ties only
    index.index.nprobe = 1
    assert index.search(users, 10).shape == (40, 10)


def test_service_answers_the_same_through_the_index(model_store: Path, redis_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    bodies = [{"user": {"id": f"u{n}"}, "k": 10} for n in (1, 2, 3, 50)] + [
        {"user": {"features": {"age": 30}}, "k": 5, "filters": {"category": ["books", "beauty"]}}]
    caplog.set_level(logging.INFO, logger="service.serving.manager")
    answers = {}
    for index in ("exact", "ivf"):
        settings = make_settings(model_store, redis_url, retrieval_index=index)
        with started_client(settings) as client:
            answers[index] = [ok_json(client.post("/v1/recommend", json=b))["items"]
                              for b in bodies]
    assert "approximate index of" in caplog.text  # the ivf app built and used one
    for exact, approximate in zip(answers["exact"], answers["ivf"], strict=True):
        assert approximate
        assert [i["item_id"] for i in approximate] == [i["item_id"] for i in exact]
        assert np.allclose([i["score"] for i in approximate], [i["score"] for i in exact],
                           atol=1e-6)
