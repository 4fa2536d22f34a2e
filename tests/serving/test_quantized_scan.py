"""The 8-bit scan either gives exactly what the float32 retrieval gives a lone user (rows, their
order and their u·c, ties included) or declines; and the service answers the same with it on
and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.ranking import Allowed, retrieve
from service.serving import quantized_scan
from service.serving.quantized_scan import QuantizedScan
from tests.serving.helpers import make_settings, ok_json, started_client


def embeddings(rng: np.random.Generator, count: int, dim: int = 32) -> np.ndarray:
    # Dimensions of very different ranges, as a trained tower gives.
    return (rng.standard_normal((count, dim)) * rng.uniform(0.05, 3.0, dim)).astype(np.float32)


def check_against_retrieve(scan: QuantizedScan, matrix: np.ndarray, users: np.ndarray,
                           n: int, allowed: Allowed | None = None) -> int:
    """How many users the scan answered; fails on any answer unlike retrieve()'s."""
    answered = 0
    for user in users:
        found = scan(user, n, allowed)
        if found is None:
            continue
        answered += 1
        rows, scores = retrieve(user[None], matrix, n, [allowed])
        np.testing.assert_array_equal(found[0], rows[0])
        np.testing.assert_array_equal(found[1], scores[0])
    return answered


def test_the_scan_answers_exactly() -> None:
    rng = np.random.default_rng(0)
    matrix = embeddings(rng, 60_000)
    users = embeddings(rng, 40) * 0.3
    scan = QuantizedScan(matrix)
    assert scan.nbytes == matrix.size  # one byte a value
    assert check_against_retrieve(scan, matrix, users, 200) >= 36  # and it is used


def test_ties_and_exclusions_as_retrieve() -> None:
    rng = np.random.default_rng(1)
    matrix = embeddings(rng, 20_000)
    matrix[10_000:12_000] = matrix[:2000]  # duplicates: exact ties, lower row first
    users = embeddings(rng, 20) * 0.3
    scan = QuantizedScan(matrix)
    assert check_against_retrieve(scan, matrix, users, 50) >= 15
    best = retrieve(users[:1], matrix, 50, [None])[0][0]
    excluded = Allowed(excluded=np.concatenate([best[:20], best[:5]]))  # with repeats
    assert check_against_retrieve(scan, matrix, users, 50, excluded) >= 15
    assert scan(users[0], 50, Allowed(mask=np.ones(len(matrix), bool))) is None  # filters


def test_declines_what_it_cannot_prove() -> None:
    rng = np.random.default_rng(2)
    # Every item's u·c within the copy's error of the others: no candidate set is provable.
    matrix = (1.0 + 1e-4 * rng.standard_normal((20_000, 16))).astype(np.float32)
    scan = QuantizedScan(matrix)
    users = rng.standard_normal((5, 16)).astype(np.float32)
    assert check_against_retrieve(scan, matrix, users, 50) == 0
    assert scan(users[0], 9000, None) is None  # asks too much of the catalog
    assert scan(np.full(16, np.nan, np.float32), 50, None) is None
    broken = matrix.copy()
    broken[7] = np.nan  # a broken item embedding: never a wrong answer, only the slow path
    assert QuantizedScan(broken)(users[0], 50, None) is None


def test_service_answers_the_same_with_the_scan(model_store: Path, redis_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantized_scan, "MIN_ITEMS", 0)  # this catalog is far smaller
    bodies = [{"user": {"id": f"u{n}"}, "k": 10} for n in (1, 2, 3, 50)] + [
        {"user": {"id": "u4"}, "k": 5, "exclude_item_ids": ["i1", "i2"]},
        {"user": {"features": {"age": 30}}, "k": 5, "filters": {"category": ["books"]}}]
    answers = {}
    for on in (False, True):
        # A shallow rerank, so that the tiny catalog is large enough for the scan.
        settings = make_settings(model_store, redis_url, quantized_scan=on, rerank_depth=5)
        with started_client(settings) as client:
            serving = client.app.state.manager.current  # type: ignore[attr-defined]
            assert (serving.scan is not None) == on
            answers[on] = [ok_json(client.post("/v1/recommend", json=b))["items"] for b in bodies]
            if on:
                user = serving.embed([serving.query("u1", None)])[0]
                assert serving.scan(user, 5, None) is not None  # the path was taken
    assert answers[True] == answers[False]


def test_no_copy_for_a_small_catalog(model_store: Path, redis_url: str) -> None:
    with started_client(make_settings(model_store, redis_url)) as client:
        assert client.app.state.manager.current.scan is None  # type: ignore[attr-defined]
