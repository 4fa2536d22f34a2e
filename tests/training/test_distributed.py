"""Training at scale: examples streamed from Parquet shards, and two real TensorFlow workers
(MultiWorkerMirroredStrategy, TF_CONFIG on loopback ports) whose exported model serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from service.data.synthetic import generate_synthetic
from service.redis_server import free_port
from service.training.example_input import COLUMNS, as_batch, write_shards
from service.training.features import fit_feature_schema, training_examples
from service.training.split import leave_last_out
from tests.serving.helpers import make_settings, started_client

REPO_ROOT = Path(__file__).resolve().parents[2]
Row = tuple[Any, ...]


def rows(batch: dict[str, Any]) -> Counter[Row]:
    columns = [np.asarray(batch[name]).tolist() for name in COLUMNS]
    return Counter(tuple(tuple(v) if isinstance(v, list) else v for v in row)
                   for row in zip(*columns, strict=True))


def padded(batch: dict[str, Any], width: int) -> dict[str, Any]:
    """Undoes trim_padding: left-pads the history back to ``width`` columns."""
    history = batch["history"]
    return batch | {"history": np.pad(history, ((0, 0), (width - history.shape[1], 0)))}


def file_rows(path: Path) -> Counter[Row]:
    table = pq.read_table(path).to_pydict()
    return rows(table)


@pytest.fixture(scope="module")
def prepared():  # type: ignore[no-untyped-def]
    data = generate_synthetic(120, 40, seed=3)
    train = leave_last_out(data.interactions, 0.2).train
    schema = fit_feature_schema(train, data.users, data.items, data.user_features,
                                data.item_features, history_length=8)
    return data, train, schema


def test_shards_hold_exactly_the_examples(tmp_path: Path, prepared) -> None:  # type: ignore[no-untyped-def]
    data, train, schema = prepared
    examples = training_examples(train, data.users, data.items, schema)
    shards = write_shards(train, data.users, data.items, schema, tmp_path, seed=0,
                          users_per_shard=25)
    assert len(shards.files) == 5
    assert shards.rows == len(examples.label)
    stored = sum((file_rows(path) for path in shards.files), Counter())
    assert stored == rows(as_batch(examples, slice(None)))


@pytest.mark.parametrize("workers", [1, 2])
def test_each_worker_streams_its_own_files_in_full_batches(
        tmp_path: Path, prepared, workers: int) -> None:  # type: ignore[no-untyped-def]
    data, train, schema = prepared
    shards = write_shards(train, data.users, data.items, schema, tmp_path, seed=0,
                          users_per_shard=25)
    batch_size = 16
    for worker in range(workers):
        mine = sum((file_rows(p) for p in shards.files[worker::workers]), Counter())
        context = tf.distribute.InputContext(num_input_pipelines=workers,
                                             input_pipeline_id=worker)
        taken: Counter[Row] = Counter()
        one_pass = mine.total() // batch_size
        for batch in shards.dataset(context, batch_size, seed=0).take(one_pass):
            assert batch["history"].shape[0] == batch_size
            assert 1 <= batch["history"].shape[1] <= 8
            taken += rows(padded({name: value.numpy() for name, value in batch.items()}, 8))
        # One pass: every batch full, every row from this worker's files, none twice.
        assert taken.total() == one_pass * batch_size
        assert not taken - mine


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.timeout(600)
def test_two_workers_train_one_model_that_serves(tmp_path: Path, redis_url: str) -> None:
    ports = [free_port(), free_port()]
    stores = [tmp_path / f"store{n}" for n in range(2)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "service.training.cli", "--data", "synthetic",
               "--synthetic-users", "300", "--synthetic-items", "100", "--epochs", "2"]
    workers = [subprocess.Popen([*command, "--model-store", str(stores[n])], cwd=REPO_ROOT,
                                env={**env, "TF_CONFIG": tf_config(ports, n)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for n in range(2)]
    try:
        outputs = [worker.communicate(timeout=540)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        assert "on 2 replicas" in output, output[-3000:]
    # Trained together: both workers saw the same validation figures every epoch.
    epochs = [[line.split("(")[0] for line in out.splitlines() if line.startswith("epoch ")]
              for out in outputs]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 2
    assert "wrote" in outputs[0] and "the chief exports" in outputs[1]
    assert (stores[0] / "default" / "1" / "saved_model.pb").is_file()
    assert not (stores[1] / "default").exists()

    settings = make_settings(stores[0], redis_url)
    with started_client(settings) as client:
        answer = client.post("/v1/recommend", json={"user": {"id": "u3"}, "k": 5})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["items"]) == 5


def test_an_invalid_tf_config_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": "{not json"}
    done = subprocess.run([sys.executable, "-m", "service.training.cli", "--data", "synthetic",
                           "--synthetic-users", "50", "--synthetic-items", "20",
                           "--model-store", str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "invalid TF_CONFIG" in done.stderr
    assert not any(tmp_path.iterdir())
