"""Per-request plumbing as plain ASGI (no per-request task overhead): request id, metrics, log,
the count of requests in flight."""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.serving.batching import InFlight
from service.serving.logs import request_id
from service.serving.metrics import Metrics

log = logging.getLogger("service.access")

# Probes and scrapes would drown the request metrics and logs.
UNMEASURED = frozenset({"/healthz", "/readyz", "/metrics"})
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Unique per process start, without a uuid4 (an os.urandom call) on every request.
        prefix = uuid.uuid4().hex[:12]
        self.ids = (f"{prefix}-{n}" for n in itertools.count(1))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or next(self.ids)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        status_sent: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status = status_sent = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Here, not in a handler outside this middleware, so the log line and the body
            # still carry the request id. A 5xx is always a bug: say so, leak nothing.
            log.exception("unhandled error")
            self.metrics.errors.labels("internal_error").inc()
            if status_sent is None:
                await send_error(send_with_id, 500, "internal_error",
                                 f"internal error; request id {rid}")
        finally:
            self._observe(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        if path in UNMEASURED:
            return
        route = route_template(scope)
        method = scope.get("method", "")
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.latency.labels(route, method, str(status)).observe(seconds)
        log.info("%s %s %d %.1fms", method, route, status, seconds * 1000)


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.match(text) else None
    return None


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label values), never the raw path."""
    route: Any = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class CountInFlight:
    """Counts the requests to ``paths`` from arrival to answer, so that the batch worker can
    wait for those already received (batching.Runner)."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], in_flight: InFlight) -> None:
        self.app = app
        self.paths = paths
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1


class ApiKeyGuard:
    """Every /v1/* request must carry X-API-Key; checked before the body is even read, in
    constant time. Probes and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: Metrics) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            given = dict(scope.get("headers", [])).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.errors.labels("unauthorized").inc()
                await send_error(send, 401, "unauthorized", "missing or wrong X-API-Key header")
                return
        await self.app(scope, receive, send)


class BodyGuard:
    """Request bodies must be JSON and at most ``max_bytes``: 415 / 413 before any parsing,
    counting the bytes as they arrive (a client can lie in Content-Length or stream chunks)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        has_body = b"transfer-encoding" in headers or (declared not in (None, b"0"))
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if has_body and not is_json(content_type):
            await self._reject(send, 415, "unsupported_media_type",
                               "the body must be JSON (Content-Type: application/json)")
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, 413, "payload_too_large",
                               f"the body is over {self.max_bytes} bytes")
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # Raised into the body read: FastAPI passes HTTPExceptions through, and the
                # app's handler answers once, in the contract's error shape.
                raise HTTPException(413, f"the body is over {self.max_bytes} bytes")
            return message

        return counted

    async def _reject(self, send: Send, status: int, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        await send_error(send, status, code, message)


def is_json(content_type: bytes) -> bool:
    return content_type == b"application/json" or content_type.endswith(b"+json")


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """The contract's error body, sent straight from ASGI middleware."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body",
                "body": orjson.dumps({"error": {"code": code, "message": message}})})
