"""Training fixtures beside the session-wide ones of tests/conftest.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.data.dataset import LABEL, TRUE_PROBABILITY, Dataset


def implicit(dataset: Dataset) -> Dataset:
    """The synthetic clicks alone, as implicit feedback (every row a positive)."""
    clicks = dataset.interactions[dataset.interactions[LABEL] == 1]
    return dataclasses.replace(
        dataset, interactions=clicks.drop(columns=[TRUE_PROBABILITY]).reset_index(drop=True),
        has_labels=False)


def train_implicit(store: Path, dataset: Dataset, members: int | None):  # type: ignore[no-untyped-def]
    import keras

    from service.training.model import ModelConfig
    from service.training.pipeline import RunOptions, run
    from service.training.trainer import TrainConfig

    keras.utils.set_random_seed(0)
    # always_fuse: whether tiny data's validation prefers the fusion is a coin toss.
    options = RunOptions(model=ModelConfig(members=members),
                         train=TrainConfig(epochs=2, batch_size=256), history_length=10,
                         always_fuse=True)
    return run(implicit(dataset), store, "default", options, progress=lambda _line: None)


@pytest.fixture(scope="session")
def trained_fused(tmp_path_factory, synthetic_dataset):  # type: ignore[no-untyped-def]
    """The default model on the tiny synthetic data's clicks alone (implicit feedback): two
    members fused into one exported version."""
    return train_implicit(tmp_path_factory.mktemp("fused_store"), synthetic_dataset, None)
