"""What a model version on disk looks like: shared by the exporter and the server.

Layout (TensorFlow Serving's): ``<store>/<name>/<version>/`` holding ``saved_model.pb``,
``variables/``, ``assets/`` and ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.data.dataset import FeatureSpec

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ASSETS_DIR = "assets"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
HISTORY_COLUMN = "history"

USER_TOWER = "user_tower"
ITEM_TOWER = "item_tower"
SCORE = "score"
# Only in a model with query-time buckets: query_time (Unix seconds) -> time_embedding, which
# is added to the user tower's user_embedding to make the u the score signature takes.
QUERY_TIME = "query_time"
SIGNATURES = (USER_TOWER, ITEM_TOWER, SCORE)

USER_EMBEDDING = "user_embedding"
ITEM_EMBEDDING = "item_embedding"
TIME_EMBEDDING = "time_embedding"

# Retrieval modes: "dot" ranks by user·item then reranks the best with the head; "exhaustive"
# scores every item with the head (the seed model, whose head has no user-item interaction).
RETRIEVAL_DOT = "dot"
RETRIEVAL_EXHAUSTIVE = "exhaustive"

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def input_name(feature: str) -> str:
    """The signature argument name of a feature column (signature names must be identifiers)."""
    safe = _UNSAFE.sub("_", feature)
    return safe if safe[:1].isalpha() else f"f_{safe}"


@dataclass(frozen=True)
class ModelSpec:
    """The part of metadata.json that the server needs to call the signatures."""

    arch: str
    retrieval: str
    embedding_dim: int
    history_length: int
    user_features: FeatureSpec
    item_features: FeatureSpec
    # Where the query time's buckets split (Unix seconds); None: the model takes no query
    # time (the seed model, data without times, versions exported before it existed).
    time_boundaries: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "retrieval": self.retrieval,
                "embedding_dim": self.embedding_dim, "history_length": self.history_length,
                "user_features": self.user_features.to_dict(),
                "item_features": self.item_features.to_dict(),
                "time_boundaries": (list(self.time_boundaries)
                                    if self.time_boundaries is not None else None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(arch=str(data["arch"]), retrieval=str(data["retrieval"]),
                   embedding_dim=int(data["embedding_dim"]),
                   history_length=int(data["history_length"]),
                   user_features=FeatureSpec.from_dict(data["user_features"]),
                   item_features=FeatureSpec.from_dict(data["item_features"]),
                   time_boundaries=(tuple(float(b) for b in data["time_boundaries"])
                                    if data.get("time_boundaries") is not None else None))


def time_buckets(times: ArrayLike, boundaries: tuple[float, ...]) -> NDArray[np.int32]:
    """The query-time bucket of each time (Unix seconds): how many of the model's
    ``time_boundaries`` are at or before it (0 to len); the trainer and the server both use it,
    the query_time signature computes the same inside the SavedModel."""
    return np.searchsorted(np.asarray(boundaries, dtype=np.float64),
                           np.asarray(times, dtype=np.float64), side="right").astype(np.int32)


def version_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """Version directories under ``<store>/<name>``, highest first (positive-int names)."""
    if not model_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in model_dir.iterdir()
             if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
    return sorted(found, reverse=True)


def content_fingerprint(version_dir: Path) -> str:
    """A digest of every file of a version (paths and bytes), so equal name+version in two
    stores with different content never share cache entries."""
    digest = hashlib.sha256()
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(version_dir).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
