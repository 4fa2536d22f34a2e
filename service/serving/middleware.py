"""Per-request plumbing as plain ASGI (no per-request task overhead): request id, metrics, log."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or uuid.uuid4().hex
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
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": orjson.dumps(
                    {"error": {"code": "internal_error",
                               "message": f"internal error; request id {rid}"}})})
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
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": orjson.dumps(
                    {"error": {"code": "unauthorized",
                               "message": "missing or wrong X-API-Key header"}})})
                return
        await self.app(scope, receive, send)
