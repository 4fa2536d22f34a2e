"""HTTP routes: thin wrappers over the DataPlane."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.serving.dataplane import DataPlane
from service.serving.schemas import (
    ErrorResponse,
    ModelDescription,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
)


def plane_of(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


async def dataplane(request: Request) -> DataPlane:
    # async: a plain function would be sent to the thread pool on every request.
    return plane_of(request)


Plane = Annotated[DataPlane, Depends(dataplane)]
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (401, 409, 413, 422, 503)}

api = APIRouter(prefix="/v1", responses=ERRORS)
# The routes whose model work goes through the runner (its batches).
BATCHED_PATHS = frozenset({"/v1/score", "/v1/recommend"})
probes = APIRouter()


# Async: validation runs on the event loop, model work in the runner's thread (never here).
# The hot routes read the plane off the app rather than through Depends (FastAPI's
# dependency machinery parses the query string and more on every request), and answer
# orjson bytes: the response models document the bodies (see DataPlane.score).
@api.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request) -> Response:
    return json_bytes(await plane_of(request).score(body))


@api.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, request: Request) -> Response:
    return json_bytes(await plane_of(request).recommend(body))


def json_bytes(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@api.get("/model", response_model=ModelDescription)
def model(plane: Plane) -> ModelDescription:
    return plane.describe()


@api.post("/admin/reload", response_model=ReloadResponse)
def reload(plane: Plane) -> ReloadResponse:
    return plane.reload()


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Deliberately checks nothing else."""
    return {"status": "ok"}


@probes.get("/readyz")
def readyz(plane: Plane) -> JSONResponse:
    ready, body = plane.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


@probes.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(),
                    media_type=CONTENT_TYPE_LATEST)
