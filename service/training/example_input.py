"""Where the trainer's batches come from: arrays in memory, or Parquet shards streamed from disk.

Each source gives one worker's endless stream of shuffled batches as a ``tf.data.Dataset``
(``tf.distribute`` calls ``dataset`` once per worker with that worker's input context); the
trainer takes ``steps_per_epoch`` batches per epoch, the same number on every worker, as
collective training requires.

The causal history makes an example ~50 times larger than its interaction row, so on large data
the example arrays, not the interactions, are what does not fit in memory. ``write_shards``
builds them a slice of users at a time (a user's history depends on that user's rows only) and
writes each slice, shuffled, as one Parquet file; ``ParquetShards`` reads them back record batch
by record batch, each worker its own files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
from numpy.typing import NDArray

from service.data.dataset import USER_ID
from service.training.features import FeatureSchema, TrainingExamples, training_examples

Batch = dict[str, NDArray[Any]]
COLUMNS = ("user_row", "user_index", "item_row", "label", "history", "time_bucket")
USERS_PER_SHARD = 20_000
READ_ROWS = 8192
SHUFFLE_ROWS = 4 * READ_ROWS  # rows shuffled together when read back


class ExampleSource(Protocol):
    rows: int
    history_length: int

    def dataset(self, context: tf.distribute.InputContext, batch_size: int,
                seed: int) -> tf.data.Dataset: ...


def signature() -> dict[str, tf.TensorSpec]:
    return {"user_row": tf.TensorSpec([None], tf.int64),
            "user_index": tf.TensorSpec([None], tf.int32),
            "item_row": tf.TensorSpec([None], tf.int64),
            "label": tf.TensorSpec([None], tf.float32),
            # Width varies per batch (trim_padding), at most the history length.
            "history": tf.TensorSpec([None, None], tf.int32),
            "time_bucket": tf.TensorSpec([None], tf.int32)}


def trim_padding(history: NDArray[np.int32]) -> NDArray[np.int32]:
    """Drops the columns that are padding in every row (at least one column stays): the
    towers do not depend on the window's width, and short histories (e.g. synthetic data's
    few positives per user) then cost a fraction of the full window."""
    filled = np.flatnonzero((history != 0).any(axis=0))
    return history[:, min(filled[0], history.shape[1] - 1) if len(filled) else -1:]


def trimmed(batch: Batch) -> Batch:
    return batch | {"history": trim_padding(batch["history"])}


def as_batch(examples: TrainingExamples, rows: NDArray[np.int64] | slice) -> Batch:
    return {name: getattr(examples, name)[rows] for name in COLUMNS}


class InMemoryExamples:
    """The examples as arrays; each worker draws from its own share of the rows."""

    def __init__(self, examples: TrainingExamples) -> None:
        self.examples = examples
        self.rows = len(examples.label)
        self.history_length = int(examples.history.shape[1])

    def dataset(self, context: tf.distribute.InputContext, batch_size: int,
                seed: int) -> tf.data.Dataset:
        mine = np.arange(context.input_pipeline_id, self.rows, context.num_input_pipelines)
        if not len(mine):
            raise ValueError(f"{self.rows} examples for {context.num_input_pipelines} workers")

        def batches() -> Iterator[Batch]:
            rng = np.random.default_rng([seed, context.input_pipeline_id])
            while True:
                order = rng.permutation(mine)
                for start in range(0, len(order), batch_size):
                    yield trimmed(as_batch(self.examples, order[start:start + batch_size]))

        return tf.data.Dataset.from_generator(
            batches, output_signature=signature()).prefetch(2)


def write_shards(interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                 schema: FeatureSchema, directory: Path, seed: int,
                 users_per_shard: int = USERS_PER_SHARD) -> ParquetShards:
    """The training examples of ``interactions`` as shuffled Parquet files, one per slice of
    users; the peak memory is one slice's examples."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    user_order = np.sort(interactions[USER_ID].unique())
    files = []
    for number, start in enumerate(range(0, len(user_order), users_per_shard)):
        chosen = interactions[interactions[USER_ID].isin(user_order[start:start + users_per_shard])]
        examples = training_examples(chosen, users, items, schema)
        batch = as_batch(examples, rng.permutation(len(examples.label)))
        table = pa.table({name: values for name, values in batch.items() if name != "history"}
                         | {"history": pa.FixedSizeListArray.from_arrays(
                             batch["history"].reshape(-1), schema.history_length)})
        path = directory / f"examples-{number:05d}.parquet"
        pq.write_table(table, path, row_group_size=READ_ROWS)
        files.append(path)
    return ParquetShards(files, schema.history_length)


class ParquetShards:
    """Examples streamed from Parquet files: worker i reads files i, i + n, ... in a fresh
    order each pass, READ_ROWS rows at a time, shuffled within windows of SHUFFLE_ROWS (the
    writer shuffled each file as a whole)."""

    def __init__(self, files: list[Path], history_length: int) -> None:
        self.files = files
        self.history_length = history_length
        self.rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)

    def dataset(self, context: tf.distribute.InputContext, batch_size: int,
                seed: int) -> tf.data.Dataset:
        mine = self.files[context.input_pipeline_id::context.num_input_pipelines]
        if not mine:
            raise ValueError(f"{len(self.files)} example files for "
                             f"{context.num_input_pipelines} workers: each needs at least one")

        def batches() -> Iterator[Batch]:
            rng = np.random.default_rng([seed, context.input_pipeline_id])
            pending: list[Batch] = []
            while True:
                for index in rng.permutation(len(mine)):
                    for record in pq.ParquetFile(mine[index]).iter_batches(READ_ROWS):
                        pending.append(self._decode(record))
                        if sum(len(p["label"]) for p in pending) >= SHUFFLE_ROWS:
                            yield from self._cut(pending, batch_size, rng)
                    yield from self._cut(pending, batch_size, rng)

        return tf.data.Dataset.from_generator(
            batches, output_signature=signature()).prefetch(2)

    def _decode(self, record: pa.RecordBatch) -> Batch:
        out = {name: record.column(name).to_numpy() for name in COLUMNS if name != "history"}
        history = record.column("history").flatten().to_numpy()
        out["history"] = history.reshape(-1, self.history_length)
        return out

    @staticmethod
    def _cut(pending: list[Batch], batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Whole shuffled batches from the pending reads; the remainder stays pending."""
        merged = {name: np.concatenate([p[name] for p in pending]) for name in COLUMNS}
        order = rng.permutation(len(merged["label"]))
        whole = len(order) // batch_size * batch_size
        for start in range(0, whole, batch_size):
            yield trimmed({name: values[order[start:start + batch_size]]
                           for name, values in merged.items()})
        pending[:] = [{name: values[order[whole:]] for name, values in merged.items()}]


def steps_per_epoch(rows: int, global_batch_size: int) -> int:
    return max(1, math.ceil(rows / global_batch_size))
