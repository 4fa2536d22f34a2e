"""The service's configuration: the only place that reads the environment (RECSYS_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.ranking import RERANK_DEPTH


class Settings(BaseSettings):
    # An empty variable (e.g. compose's `RECSYS_API_KEY:`) means unset, never an empty key.
    model_config = SettingsConfigDict(env_prefix="RECSYS_", protected_namespaces=(),
                                      extra="ignore", env_ignore_empty=True)

    model_store: Path = Path("model_store")
    """The model store root: ``<model_store>/<model_name>/<version>/``."""
    model_name: str = "default"
    """Which model under the store to serve (its highest valid version)."""
    redis_url: str | None = None
    """Redis shared by all replicas; unset: the service starts a private embedded Redis."""
    api_key: SecretStr | None = None
    """When set, every /v1/* request must carry this value in the X-API-Key header."""

    redis_cluster: bool = False
    """RECSYS_REDIS_URL names one node of a Redis Cluster: the cluster client finds the others
    (a version's keys share one hash tag, so each version lives in one slot)."""
    redis_prefix: str = "recsys:"
    """Prefix of every Redis key this service writes."""
    redis_timeout_s: float = Field(0.5, gt=0)
    """Socket timeout of every Redis call; Redis is a cache, never worth a slow request."""
    item_cache_ttl_s: int | None = Field(7 * 24 * 3600, gt=0)
    """Expiry of a version's cached item matrix in Redis (refreshed when written)."""
    lock_timeout_s: float = Field(300.0, gt=0)
    """Expiry of the lock held while one process computes a version's item matrix."""

    max_k: int = Field(1000, ge=1)
    """Largest k accepted by /v1/recommend."""
    max_item_ids: int = Field(10_000, ge=1)
    """Most item ids accepted in one request (item_ids, exclude_item_ids)."""
    max_body_bytes: int = Field(4 << 20, ge=1024)
    """Largest request body accepted (413 beyond); 10,000 ids of 256 characters fit."""
    rerank_depth: int = Field(RERANK_DEPTH, ge=1)
    """How many items retrieval by u·c passes to the head for reranking (see
    ranking.RERANK_DEPTH for the default's measurements)."""
    retrieval_index: Literal["exact", "ivf"] = "exact"
    """How retrieval by u·c finds its candidates: "exact" scores every item; "ivf" asks an
    approximate Faiss index (for catalogs of about a million items and more)."""
    quantized_scan: bool = True
    """Exact retrieval for a lone request over 50k items or more first scans an 8-bit copy of
    the item matrix (d bytes per item more memory; see serving/quantized_scan.py), then checks
    its candidates against the float32 matrix: the same answer, about twice as fast at 1M
    items. Off: the float32 product only. Not with retrieval_index "ivf"."""
    precompute_users: bool = True
    """Compute every stored user's embedding in the background once a version is served
    (otherwise each on the user's first request); 4·d bytes per stored user, for at most a
    million users per process (the others are computed on each request)."""
    ann_nprobe: int = Field(32, ge=1)
    """Lists of the approximate index searched per user: more is slower and closer to exact."""
    batch_max_size: int = Field(32, ge=1)
    """Most concurrent requests computed together (one matrix product); 1 turns batching off."""
    batch_timeout_us: int = Field(5000, ge=0)
    """How long the batch worker waits, at most, for requests this process has already received
    to join a batch (0: it takes what is queued). Never for a request not yet received, so a
    lone request runs at once."""
    item_batch_size: int = Field(8192, ge=1)
    """Items per item-tower call when computing the item matrix."""

    poll_interval_s: float = Field(30.0, ge=0)
    """How often to look for a new model version; 0 disables polling."""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> Settings:
        # The private embedded Redis is a single server, never a cluster.
        if self.redis_cluster and not self.redis_url:
            raise ValueError("RECSYS_REDIS_CLUSTER needs RECSYS_REDIS_URL (a node of the cluster)")
        return self
