"""Writes a trained model as a new version of the model store (TensorFlow Serving's layout).

The SavedModel's signatures take raw values (strings, floats) and do the vocabulary lookups and
normalisation inside, so a server needs nothing but the version directory. Everything is written
to a hidden temporary directory first and renamed into place, so a half-written version is never
visible and an existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from service.data.dataset import USER_ID
from service.model_format import (
    ASSETS_DIR,
    ITEM_EMBEDDING,
    ITEM_TOWER,
    ITEMS_FILE,
    METADATA_FILE,
    QUERY_TIME,
    SCORE,
    TIME_EMBEDDING,
    USER_EMBEDDING,
    USER_TOWER,
    USERS_FILE,
    ModelSpec,
    input_name,
    version_dirs,
)
from service.training.features import (
    BUCKET_SUFFIX,
    NUMERIC_CLIP,
    FeatureSchema,
    TableSchema,
    Vocabulary,
)
from service.training.model import Recommender


def lookup_table(vocabulary: Vocabulary) -> tf.lookup.StaticHashTable:
    """string -> index, with 0 for anything not in the vocabulary (as Vocabulary.encode)."""
    keys = tf.constant(list(vocabulary.tokens) or [""], dtype=tf.string)
    values = tf.range(1, len(vocabulary.tokens) + 1, dtype=tf.int32) if vocabulary.tokens \
        else tf.constant([0], dtype=tf.int32)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), 0)


class TableEncoder(tf.Module):
    """Raw side features of one table -> the encoded inputs the towers were trained on."""

    def __init__(self, schema: TableSchema) -> None:
        super().__init__()
        self.schema = schema
        self.tables = {name: lookup_table(vocab) for name, vocab in schema.vocabularies.items()}

    def specs(self) -> dict[str, tf.TensorSpec]:
        spec = self.schema.spec
        out = {input_name(n): tf.TensorSpec([None], tf.string, input_name(n))
               for n in spec.categorical}
        out.update({input_name(n): tf.TensorSpec([None, None], tf.string, input_name(n))
                    for n in spec.multi})
        out.update({input_name(n): tf.TensorSpec([None], tf.float32, input_name(n))
                    for n in spec.numeric})
        return out

    def __call__(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        spec, encoded = self.schema.spec, {}
        for name in spec.categorical + spec.multi:
            encoded[name] = self.tables[name].lookup(raw[input_name(name)])
        for name in spec.numeric:
            stats = self.schema.numeric[name]
            x = (raw[input_name(name)] - stats.mean) / stats.std
            finite = tf.math.is_finite(raw[input_name(name)])
            encoded[name] = tf.clip_by_value(tf.where(finite, x, tf.zeros_like(x)),
                                             -NUMERIC_CLIP, NUMERIC_CLIP)
            boundaries = tf.constant([stats.boundaries], tf.float32) if stats.boundaries \
                else tf.zeros([1, 0], tf.float32)
            buckets = tf.searchsorted(boundaries, raw[input_name(name)][None, :],
                                      side="right", out_type=tf.int32)[0] + 1
            encoded[name + BUCKET_SUFFIX] = tf.where(finite, buckets, tf.zeros_like(buckets))
        return encoded


class ServingModule(tf.Module):
    """The named signatures over raw inputs: three, and query_time when the model has it."""

    def __init__(self, model: Recommender, schema: FeatureSchema) -> None:
        super().__init__()
        # The Keras models stay untracked (they would add signatures of their own); their
        # variables are tracked so the signatures can capture them.
        self.model_variables = [v.value for v in model.variables]
        self.user_ids = lookup_table(schema.user_ids)
        self.item_ids = lookup_table(schema.item_ids)
        self.user_encoder = TableEncoder(schema.users)
        self.item_encoder = TableEncoder(schema.items)
        self.history_length = schema.history_length
        user_spec = {"user_id": tf.TensorSpec([None], tf.string, "user_id"),
                     "history": tf.TensorSpec([None, None], tf.string, "history"),
                     **self.user_encoder.specs()}
        item_spec = {"item_id": tf.TensorSpec([None], tf.string, "item_id"),
                     **self.item_encoder.specs()}
        user_dim = int(model.user_tower.output_dim)
        item_dim = int(model.item_tower.output_dim)
        self.user_tower = tf.function(self._user_tower, input_signature=[user_spec])
        self.item_tower = tf.function(self._item_tower, input_signature=[item_spec])
        self.score = tf.function(self._score, input_signature=[
            tf.TensorSpec([None, user_dim], tf.float32, USER_EMBEDDING),
            tf.TensorSpec([None, None, item_dim], tf.float32, ITEM_EMBEDDING)])
        self.query_time: Any = None
        if model.query_time is not None and schema.time_boundaries is not None:
            self.time_boundaries = tf.constant([schema.time_boundaries], tf.float64)
            self.query_time = tf.function(self._query_time, input_signature=[
                tf.TensorSpec([None], tf.float64, QUERY_TIME)])
        self._model = model

    def signatures(self) -> dict[str, Any]:
        found = {USER_TOWER: self.user_tower, ITEM_TOWER: self.item_tower, SCORE: self.score}
        if self.query_time is not None:
            found[QUERY_TIME] = self.query_time
        return found

    def _user_tower(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = self.user_encoder(raw)
        inputs["user_id"] = self.user_ids.lookup(raw["user_id"])
        inputs["history"] = self.item_ids.lookup(raw["history"][:, -self.history_length:])
        return {USER_EMBEDDING: self._model.user_tower(inputs)}

    def _item_tower(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = self.item_encoder(raw)
        inputs["item_id"] = self.item_ids.lookup(raw["item_id"])
        return {ITEM_EMBEDDING: self._model.item_tower(inputs)}

    def _query_time(self, query_time: tf.Tensor) -> dict[str, tf.Tensor]:
        assert self._model.query_time is not None
        buckets = tf.searchsorted(self.time_boundaries, query_time[None], side="right",
                                  out_type=tf.int32)[0]
        return {TIME_EMBEDDING: self._model.query_time({"time_bucket": buckets})}

    def _score(self, user_embedding: tf.Tensor, item_embedding: tf.Tensor) -> dict[str, tf.Tensor]:
        logit = self._model.head(user_embedding, item_embedding)
        return {SCORE: tf.sigmoid(logit), "logit": logit}


@dataclass
class ExportBundle:
    """What goes into a version besides the SavedModel."""

    model: Recommender
    schema: FeatureSchema
    spec: ModelSpec
    items: pd.DataFrame
    users: pd.DataFrame
    metadata: dict[str, Any]
    extra_files: dict[str, bytes]


def write_vocabularies(schema: FeatureSchema, assets: Path) -> None:
    files = {"vocab_user_id.txt": schema.user_ids, "vocab_item_id.txt": schema.item_ids}
    for table, table_schema in (("user", schema.users), ("item", schema.items)):
        for name, vocab in table_schema.vocabularies.items():
            files[f"vocab_{table}_{input_name(name)}.txt"] = vocab
    for filename, vocab in files.items():
        (assets / filename).write_text("".join(f"{t}\n" for t in vocab.tokens), encoding="utf-8")


def write_version(bundle: ExportBundle, tmp: Path) -> None:
    module = ServingModule(bundle.model, bundle.schema)
    tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    assets = tmp / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    bundle.items.to_parquet(assets / ITEMS_FILE, index=False)
    bundle.users.to_parquet(assets / USERS_FILE, index=False)
    write_vocabularies(bundle.schema, assets)
    for name, content in bundle.extra_files.items():
        (tmp / name).write_bytes(content)
    metadata = {**bundle.metadata, "model": bundle.spec.to_dict(),
                "item_count": len(bundle.items), "user_count": len(bundle.users)}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=_json_default),
                                     encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def export_version(bundle: ExportBundle, store: Path, name: str) -> Path:
    """Writes the bundle as ``store/name/<next version>`` atomically; returns its path."""
    model_dir = store / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=model_dir))
    try:
        write_version(bundle, tmp)
        return _rename_into_place(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, model_dir: Path) -> Path:
    """Takes the next free version number; a concurrent export that won the race moves us up."""
    while True:
        versions = version_dirs(model_dir)
        target = model_dir / str((versions[0][0] if versions else 0) + 1)
        try:
            target.mkdir()  # claims the number: mkdir fails if another export has it
        except FileExistsError:
            continue
        os.replace(tmp, target)  # replacing our own empty claim is atomic
        return target


def user_table(users: pd.DataFrame, histories: dict[str, list[str]]) -> pd.DataFrame:
    """users.parquet: user_id, history (training interactions, oldest first), features."""
    table = users.copy()
    table.insert(1, "history", [histories.get(u, []) for u in table[USER_ID]])
    return table

