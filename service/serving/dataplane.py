"""What each endpoint does, without HTTP: limits, the version snapshot, the response bodies."""

from __future__ import annotations

from typing import Any

from service.serving.batching import Runner
from service.serving.errors import LimitExceeded, NotReady, VersionRefused
from service.serving.item_cache import ItemMatrixCache
from service.serving.manager import ModelManager
from service.serving.schemas import (
    ModelDescription,
    ModelRef,
    RecommendRequest,
    ReloadResponse,
    ScoreRequest,
)
from service.serving.servable import RecommendCall, ScoreCall, ServingModel
from service.settings import Settings


class DataPlane:
    def __init__(self, settings: Settings, manager: ModelManager,
                 cache: ItemMatrixCache | None, runner: Runner) -> None:
        self.settings = settings
        self.manager = manager
        self.cache = cache
        self.runner = runner

    def model(self) -> ServingModel:
        """The version this request runs on, start to end (later swaps do not affect it)."""
        current = self.manager.current
        if current is None:
            raise NotReady("no model version is loaded yet: "
                           f"{self.manager.last_error or 'loading'}")
        return current

    def check_count(self, name: str, count: int) -> None:
        if count > self.settings.max_item_ids:
            raise LimitExceeded(f"{name} has {count} ids; the maximum is "
                                f"{self.settings.max_item_ids} (RECSYS_MAX_ITEM_IDS)")

    # The hot endpoints answer their body as plain JSON data (ScoreResponse and
    # RecommendResponse document it): pydantic models for 100 scored items took 116 us to
    # build and serialise, these dicts 16 us with orjson.
    async def score(self, request: ScoreRequest) -> dict[str, Any]:
        self.check_count("item_ids", len(request.item_ids))
        model = self.model()
        query = model.query(request.user.id, request.user.features, request.context.seconds())
        known, rows, unknown = model.lookup(request.item_ids)
        scores = await self.runner.score(model, ScoreCall(query, rows)) if rows else []
        return {"model": model_ref(model),
                "scores": [{"item_id": i, "score": s} for i, s in zip(known, scores, strict=True)],
                "unknown_item_ids": unknown}

    async def recommend(self, request: RecommendRequest) -> dict[str, Any]:
        if request.k > self.settings.max_k:
            raise LimitExceeded(f"k={request.k} is above the maximum of {self.settings.max_k} "
                                "(RECSYS_MAX_K)")
        self.check_count("exclude_item_ids", len(request.exclude_item_ids))
        self.check_count("filters", sum(len(v) for v in request.filters.values()))
        model = self.model()
        query = model.query(request.user.id, request.user.features, request.context.seconds())
        allowed = model.allowed(query, request.exclude_item_ids, request.exclude_seen,
                                request.filters)
        items = await self.runner.recommend(model, RecommendCall(query, request.k, allowed))
        return {"model": model_ref(model),
                "items": [{"item_id": i, "score": s} for i, s in items]}

    def describe(self) -> ModelDescription:
        model = self.model()
        metadata = model.version.metadata
        return ModelDescription(
            name=model.name, version=model.number, created_at=metadata.get("created_at"),
            item_count=model.item_count, user_count=len(model.users),
            embedding_dim=int(model.item_matrix.shape[1]), arch=model.spec.arch,
            retrieval=model.spec.retrieval,
            query_time_buckets=len(model.time_vectors.vectors) if model.time_vectors else 0,
            fingerprint=model.version.fingerprint,
            item_representations_source=model.source, data=metadata.get("data", {}),
            metrics=metadata.get("evaluation", {}).get("metrics", {}))

    def reload(self) -> ReloadResponse:
        result = self.manager.refresh()
        current = self.manager.current
        if result.refused:
            serving = f"; serving version {current.number}" if current else "; nothing served"
            raise VersionRefused("refused " + "; ".join(
                f"version {n}: {why}" for n, why in sorted(result.refused.items())) + serving)
        model = self.model()
        return ReloadResponse(model=ModelRef(**model_ref(model)), changed=result.changed)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        current = self.manager.current
        redis_ok = self.cache is not None and self.cache.ping()
        checks: dict[str, Any] = {
            "model": ({"ok": True, "name": current.name, "version": current.number}
                      if current else {"ok": False, "error": self.manager.last_error
                                       or "loading"}),
            "item_representations": ({"ok": True, "count": current.item_count,
                                      "source": current.source}
                                     if current else {"ok": False}),
            "redis": {"ok": redis_ok} if redis_ok else {
                "ok": False, "error": (self.cache.last_error if self.cache else None)
                or "unreachable"},
        }
        if current is None:
            return False, {"status": "not_ready", "failed": "model", "checks": checks}
        return True, {"status": "ready" if redis_ok else "degraded", "checks": checks}


def model_ref(model: ServingModel) -> dict[str, Any]:
    return {"name": model.name, "version": model.number}
