"""The FastAPI application: `create_app(settings)`; nothing heavy happens at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.redis_server import EmbeddedRedis, RedisServerError
from service.serving.batching import InFlight, Runner
from service.serving.dataplane import DataPlane
from service.serving.errors import ServiceError
from service.serving.item_cache import ItemMatrixCache, connect
from service.serving.logs import configure_logging
from service.serving.manager import ModelManager
from service.serving.metrics import Metrics
from service.serving.middleware import ApiKeyGuard, BodyGuard, CountInFlight, RequestContext
from service.serving.routes import BATCHED_PATHS, api, hot, probes
from service.settings import Settings

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type"}


def error_response(request: Request, status: int, code: str, message: str) -> JSONResponse:
    request.app.state.metrics.errors.labels(code).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail))


CACHE_RETRY_S = 5.0


async def maintain(manager: ModelManager, poll_interval_s: float) -> None:
    """Loads the first version now; then, every tick, looks for a newer version (when polling
    is on; until a first one loads otherwise), writes what Redis is owed once it is back, and
    frees a switched-out version once requests let go of it."""
    tick = poll_interval_s if poll_interval_s > 0 else CACHE_RETRY_S
    while True:
        try:
            if poll_interval_s > 0 or manager.current is None:
                await asyncio.to_thread(manager.refresh)
            await asyncio.to_thread(manager.settle_cache)
            if manager.retiring:
                await asyncio.to_thread(manager.release_retired)
        except Exception:  # one failed round must not end the maintenance loop
            log.exception("model maintenance failed")
        await asyncio.sleep(min(tick, 1.0) if manager.current is None else tick)


def open_cache(settings: Settings, embedded: EmbeddedRedis | None) -> ItemMatrixCache | None:
    url = settings.redis_url or (embedded.url if embedded else None)
    if url is None:
        return None
    return ItemMatrixCache(connect(url, cluster=settings.redis_cluster,
                                   timeout_s=settings.redis_timeout_s),
                           prefix=settings.redis_prefix, lock_timeout_s=settings.lock_timeout_s,
                           ttl_s=settings.item_cache_ttl_s)


def start_embedded_redis() -> EmbeddedRedis | None:
    try:
        return EmbeddedRedis().start()
    except RedisServerError as exc:
        log.error("no Redis configured and the private one did not start (%s): serving "
                  "without a shared cache", exc)
        return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    in_flight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = None if settings.redis_url else await asyncio.to_thread(start_embedded_redis)
        cache = open_cache(settings, embedded)
        manager = ModelManager(settings, cache, metrics)
        runner = Runner(settings.batch_max_size, settings.batch_timeout_us / 1e6,
                        on_batch=metrics.batch_size.observe, in_flight=in_flight)
        runner.start()
        app.state.manager = manager
        app.state.dataplane = DataPlane(settings, manager, cache, runner)
        # Loading runs in the background: liveness answers at once, readiness when loaded.
        watcher = asyncio.create_task(maintain(manager, settings.poll_interval_s))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            runner.stop()
            if cache is not None:
                cache.client.close()
            if embedded is not None:
                embedded.stop()

    app = FastAPI(title="recsys-service", version="0.1.0", lifespan=lifespan,
                  description="Scores and top-k recommendations from a feature-interaction "
                              "recommender; see CONTRACT.md")
    app.state.settings = settings
    app.state.metrics = metrics
    add_error_handlers(app)
    app.include_router(hot)
    app.include_router(api)
    app.include_router(probes)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, metrics=metrics)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key.get_secret_value(),
                           metrics=metrics)
    app.add_middleware(CountInFlight, paths=BATCHED_PATHS, in_flight=in_flight)
    app.add_middleware(RequestContext, metrics=metrics)  # added last: runs first
    return app


def app_from_environment() -> FastAPI:
    """Factory for uvicorn (`--factory`): settings and logging from the environment."""
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)
